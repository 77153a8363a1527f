// Loading, overriding, printing and documenting the protobuf-text run configuration.
#pragma once
#include <string>
#include <vector>

#include "launcher/config.pb.h"
#include "model/model_spec.h"
#include "model/optimizer.h"
#include "model/sdmoe.h"

namespace sdmoe {

// Parses FILE (protobuf text format) and applies `field.path=value` overrides. Unknown
// fields and bad values throw sdmoe::Error as "FILE:LINE:COL: message".
config::Run load_config(const std::string& path, const std::vector<std::string>& overrides);
// The same, from text already in memory (name is used in messages).
config::Run parse_config_text(const std::string& text, const std::string& name,
                              const std::vector<std::string>& overrides);
// Every field with its effective value (defaults included), in text format.
std::string resolved_config_text(const config::Run& run);
// One line per field: path, type, default and help, from the .proto.
std::string config_reference();

ModelSpec model_spec_from(const config::Model& model);
OptimizerSpec optimizer_spec_from(const config::Optimizer& opt, int64_t total_steps);
// Throws sdmoe::Error on a repeated matrix; validate() checks the rest against the model.
SdmoeSpec sdmoe_spec_from(const config::Sdmoe& sdmoe);

}  // namespace sdmoe
