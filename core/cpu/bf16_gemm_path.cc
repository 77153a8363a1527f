// Which kernel runs GEMMs on bf16 operands in this process, chosen once.
//
// The fastest bf16 instruction differs between the CPUs these runs meet: Intel Sapphire
// Rapids has AMX tiles (TDPBF16PS), several times its fp32 FMA rate, while its AVX-512
// vdpbf16ps runs at half the fp32 FMA rate (measured: about 103 against 210 GFLOP/s per
// core); AMD Zen 4 has no AMX, and its vdpbf16ps is the faster path there. Where neither
// helps, widening the operands to fp32 and running the fp32 kernel is fastest, and it is
// the portable fallback on CPUs without bf16 instructions.
#include <cstdlib>
#include <mutex>
#include <string>

#include "core/check.h"
#include "core/cpu/cpu_backend.h"
#include "core/cpu/gemm_bf16_amx.h"
#include "core/cpu/gemm_bf16_avx512.h"

namespace sdmoe {
namespace {

struct Choice {
  Bf16GemmPath path = Bf16GemmPath::WIDEN;
  std::string reason;
};

Choice choose() {
  const bool amx = cpu::cpu_supports_amx_bf16(), dot = cpu::cpu_supports_avx512_bf16();
  if (const char* forced = std::getenv("SDMOE_CPU_BF16_GEMM")) {
    const std::string v = forced;
    if (v == "amx") {
      if (!amx) fail("SDMOE_CPU_BF16_GEMM=amx, but this CPU (or its OS) does not offer AMX-BF16");
      return {Bf16GemmPath::AMX, "AMX tiles (set by SDMOE_CPU_BF16_GEMM)"};
    }
    if (v == "avx512_bf16") {
      if (!dot) fail("SDMOE_CPU_BF16_GEMM=avx512_bf16, but this CPU has no AVX512_BF16");
      return {Bf16GemmPath::AVX512_BF16, "AVX512_BF16 vdpbf16ps (set by SDMOE_CPU_BF16_GEMM)"};
    }
    if (v == "widen")
      return {Bf16GemmPath::WIDEN, "operands widened to fp32 for the fp32 kernel (portable fallback, set by "
                                   "SDMOE_CPU_BF16_GEMM)"};
    fail("SDMOE_CPU_BF16_GEMM must be amx, avx512_bf16 or widen, got '{}'", v);
  }
  if (amx) return {Bf16GemmPath::AMX, "AMX tiles"};
  if (dot) {
    // One core each, briefly: whether vdpbf16ps beats fp32 FMA on this CPU.
    const double dot_peak = cpu::measure_cpu_bf16_dot_peak(1), fma_peak = measure_cpu_fma_peak(1);
    if (dot_peak > 1.1 * fma_peak)
      return {Bf16GemmPath::AVX512_BF16, fmt::format("AVX512_BF16 vdpbf16ps ({:.2f}x the fp32 FMA rate)",
                                                     dot_peak / fma_peak)};
    return {Bf16GemmPath::WIDEN,
            fmt::format("operands widened to fp32 for the fp32 kernel: this CPU's vdpbf16ps runs at {:.2f}x its fp32 "
                        "FMA rate and it has no AMX",
                        dot_peak / fma_peak)};
  }
  return {Bf16GemmPath::WIDEN,
          "operands widened to fp32 for the fp32 kernel (portable fallback: this CPU has neither AMX-BF16 nor "
          "AVX512_BF16, so BF16 runs no faster than FP32)"};
}

const Choice& choice() {
  // Not a function-local static: a failed choice (a bad SDMOE_CPU_BF16_GEMM) must throw on
  // every call, not leave a half-initialised value.
  static std::mutex mutex;
  static Choice made;
  static bool done = false;
  std::lock_guard<std::mutex> lock(mutex);
  if (!done) {
    made = choose();
    done = true;
  }
  return made;
}

}  // namespace

Bf16GemmPath cpu_bf16_gemm_path() { return choice().path; }
std::string cpu_bf16_gemm_reason() { return choice().reason; }

const char* bf16_gemm_path_name(Bf16GemmPath path) {
  switch (path) {
    case Bf16GemmPath::AMX: return "AMX";
    case Bf16GemmPath::AVX512_BF16: return "AVX512_BF16";
    case Bf16GemmPath::WIDEN: return "widen to fp32";
  }
  return "?";
}

double measure_cpu_bf16_gemm_peak(Bf16GemmPath path, int threads) {
  switch (path) {
    case Bf16GemmPath::AMX: return cpu::measure_cpu_amx_bf16_peak(threads);
    case Bf16GemmPath::AVX512_BF16: return cpu::measure_cpu_bf16_dot_peak(threads);
    case Bf16GemmPath::WIDEN: return measure_cpu_fma_peak(threads);
  }
  return 0.0;
}

}  // namespace sdmoe
