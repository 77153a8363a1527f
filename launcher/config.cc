#include "launcher/config.h"

#include <cmath>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/check.h"

namespace sdmoe {
namespace pb = google::protobuf;

namespace {

class CollectFirstError : public pb::io::ErrorCollector {
 public:
  explicit CollectFirstError(std::string name) : name_(std::move(name)) {}
  void AddError(int line, int column, const std::string& message) override {
    if (first_.empty()) first_ = fmt::format("{}:{}:{}: {}", name_, line + 1, column + 1, message);
  }
  void AddWarning(int, int, const std::string&) override {}
  const std::string& first() const { return first_; }

 private:
  std::string name_;
  std::string first_;
};

void apply_override(config::Run& run, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) fail("--set {}: expected field.path=value", assignment);
  const std::string path = assignment.substr(0, eq), value = assignment.substr(eq + 1);
  pb::Message* msg = &run;
  std::stringstream parts(path);
  std::string part;
  std::vector<std::string> names;
  while (std::getline(parts, part, '.')) names.push_back(part);
  for (size_t i = 0; i < names.size(); ++i) {
    const pb::FieldDescriptor* field = msg->GetDescriptor()->FindFieldByName(names[i]);
    if (!field) fail("--set {}: no field '{}' in {}", assignment, names[i], msg->GetDescriptor()->full_name());
    if (field->is_repeated()) fail("--set {}: repeated fields cannot be overridden", assignment);
    const bool last = i + 1 == names.size();
    if (field->type() == pb::FieldDescriptor::TYPE_MESSAGE) {
      if (last) fail("--set {}: '{}' is a message; name one of its fields", assignment, names[i]);
      msg = msg->GetReflection()->MutableMessage(msg, field);
    } else {
      if (!last) fail("--set {}: '{}' is not a message", assignment, names[i]);
      if (field->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING) {
        const bool quoted = value.size() >= 2 && value.front() == value.back() && (value[0] == '"' || value[0] == '\'');
        msg->GetReflection()->SetString(msg, field, quoted ? value.substr(1, value.size() - 2) : value);
        continue;
      }
      CollectFirstError quiet("--set");
      pb::TextFormat::Parser parser;
      parser.RecordErrorsTo(&quiet);
      if (!parser.ParseFieldValueFromString(value, field, msg))
        fail("--set {}: invalid value '{}' for {} field {}", assignment, value, field->type_name(), path);
    }
  }
}

// Sets every unset scalar to its default so that printing shows the effective config.
void fill_defaults(pb::Message* msg) {
  const pb::Reflection* r = msg->GetReflection();
  const pb::Descriptor* d = msg->GetDescriptor();
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    if (f->is_repeated()) continue;
    switch (f->cpp_type()) {
      case pb::FieldDescriptor::CPPTYPE_MESSAGE: fill_defaults(r->MutableMessage(msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_INT32: r->SetInt32(msg, f, r->GetInt32(*msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_INT64: r->SetInt64(msg, f, r->GetInt64(*msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_UINT32: r->SetUInt32(msg, f, r->GetUInt32(*msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_UINT64: r->SetUInt64(msg, f, r->GetUInt64(*msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_DOUBLE: r->SetDouble(msg, f, r->GetDouble(*msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_FLOAT: r->SetFloat(msg, f, r->GetFloat(*msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_BOOL: r->SetBool(msg, f, r->GetBool(*msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_ENUM: r->SetEnum(msg, f, r->GetEnum(*msg, f)); break;
      case pb::FieldDescriptor::CPPTYPE_STRING: r->SetString(msg, f, r->GetString(*msg, f)); break;
    }
  }
}

// No field of the schema means anything as NaN or infinity (a learning rate of 1e400
// parses as inf), so every floating-point value set in the file or by --set must be finite.
void require_finite(const pb::Message& msg, const std::string& prefix) {
  const pb::Reflection* r = msg.GetReflection();
  std::vector<const pb::FieldDescriptor*> fields;
  r->ListFields(msg, &fields);
  for (const pb::FieldDescriptor* f : fields) {
    const std::string path = prefix + f->name();
    const int count = f->is_repeated() ? r->FieldSize(msg, f) : 1;
    for (int i = 0; i < count; ++i) {
      const std::string where = f->is_repeated() ? fmt::format("{}[{}]", path, i) : path;
      double value = 0.0;
      switch (f->cpp_type()) {
        case pb::FieldDescriptor::CPPTYPE_MESSAGE:
          require_finite(f->is_repeated() ? r->GetRepeatedMessage(msg, f, i) : r->GetMessage(msg, f), where + ".");
          continue;
        case pb::FieldDescriptor::CPPTYPE_DOUBLE:
          value = f->is_repeated() ? r->GetRepeatedDouble(msg, f, i) : r->GetDouble(msg, f);
          break;
        case pb::FieldDescriptor::CPPTYPE_FLOAT:
          value = f->is_repeated() ? r->GetRepeatedFloat(msg, f, i) : r->GetFloat(msg, f);
          break;
        default: continue;
      }
      if (!std::isfinite(value)) fail("{} must be a finite number, got {}", where, value);
    }
  }
}

void describe(const pb::Descriptor* d, const std::string& prefix, std::string& out) {
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    const std::string path = prefix + f->name();
    const std::string help = f->options().GetExtension(config::help);
    if (f->type() == pb::FieldDescriptor::TYPE_MESSAGE) {
      out += fmt::format("  {:<34} {}\n", path + " { ... }", help);
      describe(f->message_type(), path + ".", out);
      continue;
    }
    if (f->is_repeated()) {  // no default beyond the empty list, which the help describes
      out += fmt::format("  {:<34} {} (repeated)\n", path, help);
      continue;
    }
    std::string def;
    switch (f->cpp_type()) {
      case pb::FieldDescriptor::CPPTYPE_INT32: def = std::to_string(f->default_value_int32()); break;
      case pb::FieldDescriptor::CPPTYPE_UINT64: def = std::to_string(f->default_value_uint64()); break;
      case pb::FieldDescriptor::CPPTYPE_DOUBLE: def = fmt::format("{}", f->default_value_double()); break;
      case pb::FieldDescriptor::CPPTYPE_BOOL: def = f->default_value_bool() ? "true" : "false"; break;
      case pb::FieldDescriptor::CPPTYPE_ENUM: def = f->default_value_enum()->name(); break;
      case pb::FieldDescriptor::CPPTYPE_STRING: def = "\"" + f->default_value_string() + "\""; break;
      default: def = "?";
    }
    out += fmt::format("  {:<34} {} (default {})\n", path, help, def);
  }
}

}  // namespace

config::Run parse_config_text(const std::string& text, const std::string& name,
                              const std::vector<std::string>& overrides) {
  config::Run run;
  CollectFirstError errors(name);
  pb::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &run)) fail("{}", errors.first().empty() ? name + ": parse error" : errors.first());
  for (const std::string& o : overrides) apply_override(run, o);
  require_finite(run, "");
  return run;
}

config::Run load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  if (!in) fail("{}: cannot open config file", path);
  if (std::filesystem::is_directory(path)) fail("{}: is a directory, not a config file", path);
  std::stringstream text;
  text << in.rdbuf();
  return parse_config_text(text.str(), path, overrides);
}

std::string resolved_config_text(const config::Run& run) {
  config::Run full = run;
  fill_defaults(&full);
  std::string out;
  pb::TextFormat::PrintToString(full, &out);
  return out;
}

std::string config_reference() {
  std::string out;
  describe(config::Run::descriptor(), "", out);
  return out;
}

ModelSpec model_spec_from(const config::Model& m) {
  ModelSpec s;
  s.vocab_size = m.vocab_size();
  s.seq_len = m.seq_len();
  s.dim = m.dim();
  s.layers = m.layers();
  s.heads = m.heads();
  s.ffn_dim = m.ffn_dim();
  s.tie_embeddings = m.tie_embeddings();
  s.rope_theta = m.rope_theta();
  s.norm_eps = m.norm_eps();
  s.init_std = m.init_std();
  const config::Moe& e = m.moe();
  s.moe.num_experts = e.num_experts();
  s.moe.top_k = e.top_k();
  s.moe.expert_ffn_dim = e.expert_ffn_dim();
  s.moe.router_score = e.router_score() == config::SIGMOID ? RouterScore::SIGMOID : RouterScore::SOFTMAX;
  s.moe.normalize_topk = e.normalize_topk();
  s.moe.aux_loss_coef = e.aux_loss_coef();
  s.moe.z_loss_coef = e.z_loss_coef();
  s.moe.shared_expert_ffn_dim = e.shared_expert_ffn_dim();
  s.moe.first_dense_layers = e.first_dense_layers();
  s.moe.layer_freq = e.layer_freq();
  return s;
}

OptimizerSpec optimizer_spec_from(const config::Optimizer& o, int64_t total_steps) {
  OptimizerSpec s;
  s.lr = o.lr();
  s.min_lr = o.min_lr();
  s.warmup_steps = o.warmup_steps();
  s.total_steps = total_steps;
  s.beta1 = o.beta1();
  s.beta2 = o.beta2();
  s.eps = o.eps();
  s.weight_decay = o.weight_decay();
  s.grad_clip = o.grad_clip();
  s.sgd = o.algorithm() == config::Optimizer::SGD;
  if (s.lr <= 0 || s.min_lr < 0 || s.min_lr > s.lr) fail("optimizer: need 0 <= min_lr <= lr and lr > 0");
  if (s.warmup_steps < 0) fail("optimizer.warmup_steps must be >= 0");
  if (s.beta1 < 0 || s.beta1 >= 1 || s.beta2 < 0 || s.beta2 >= 1) fail("optimizer: betas must be in [0, 1)");
  if (!(s.eps > 0)) fail("optimizer.eps must be positive, got {}", s.eps);
  if (!(s.weight_decay >= 0)) fail("optimizer.weight_decay must be >= 0, got {}", s.weight_decay);
  if (!(s.grad_clip >= 0)) fail("optimizer.grad_clip must be >= 0 (0 turns clipping off), got {}", s.grad_clip);
  return s;
}

SdmoeSpec sdmoe_spec_from(const config::Sdmoe& c) {
  SdmoeSpec s;
  s.enabled = c.enabled();
  s.rank = c.rank();
  s.refresh_interval = c.refresh_interval();
  s.basis = c.basis() == config::Sdmoe::LAYER_SHARED ? SdmoeBasis::LAYER_SHARED : SdmoeBasis::PER_EXPERT;
  if (c.matrices_size() > 0) {
    s.matrices.clear();
    for (int m : c.matrices()) {
      const SdmoeMatrix which = m == config::Sdmoe::GATE ? SdmoeMatrix::GATE
                                : m == config::Sdmoe::UP ? SdmoeMatrix::UP
                                                         : SdmoeMatrix::DOWN;
      if (s.selects(which)) fail("sdmoe.matrices lists {} twice", sdmoe_matrix_name(which));
      s.matrices.push_back(which);
    }
  }
  s.lr_mult_common = c.lr_mult_common();
  s.lr_mult_unique = c.lr_mult_unique();
  s.solver = c.solver() == config::Sdmoe::SUBSPACE_ITERATION ? SdmoeSolver::SUBSPACE_ITERATION : SdmoeSolver::EXACT;
  s.subspace_iterations = c.subspace_iterations();
  s.async = c.async();
  return s;
}

}  // namespace sdmoe
