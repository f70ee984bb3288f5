// Run-time choice of the per-level kernel copies (clipfast/cpu_kernels.h), the way ATen's DispatchStub
// chooses its own: ATen's capability for this process (at::get_cpu_capability(): the best level the CPU
// supports, or the one ATEN_CPU_CAPABILITY names), lowered to the best level that was compiled into this
// library and that the CPU really supports (ATEN_CPU_CAPABILITY=avx512 on an AVX2-only CPU must not
// crash). Also the cache sizes the drivers derive their tile sizes from.
#include <ATen/Version.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "clipfast/cpu_kernels.h"

namespace clipfast::cpu {

// One registration function per op file and level (csrc/cpu/vec/*.cpp). setup.py defines
// CLIPFAST_CPU_<LEVEL> for every level it compiled besides DEFAULT.
#define CLIPFAST_DECLARE_LEVEL(LEVEL)          \
  namespace LEVEL {                            \
  void register_contrastive(Kernels& k);       \
  void register_token_medoids(Kernels& k);     \
  }
CLIPFAST_DECLARE_LEVEL(DEFAULT)
#ifdef CLIPFAST_CPU_AVX2
CLIPFAST_DECLARE_LEVEL(AVX2)
#endif
#ifdef CLIPFAST_CPU_AVX512
CLIPFAST_DECLARE_LEVEL(AVX512)
#endif
#undef CLIPFAST_DECLARE_LEVEL

namespace {

#define CLIPFAST_FILL(LEVEL, BYTES)     \
  do {                                  \
    k.level = #LEVEL;                   \
    k.vector_bytes = BYTES;             \
    LEVEL::register_contrastive(k);     \
    LEVEL::register_token_medoids(k);   \
  } while (0)

Kernels choose() {
  Kernels k{};
  const std::string aten = at::get_cpu_capability();
#ifdef CLIPFAST_CPU_AVX512
  if (aten == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    CLIPFAST_FILL(AVX512, 64);
    return k;
  }
#endif
#ifdef CLIPFAST_CPU_AVX2
  if ((aten == "AVX512" || aten == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    CLIPFAST_FILL(AVX2, 32);
    return k;
  }
#endif
  (void)aten;
#if defined(__aarch64__)
  CLIPFAST_FILL(DEFAULT, 16);  // NEON: at::vec's 128-bit Vectorized on aarch64
#else
  CLIPFAST_FILL(DEFAULT, 32);  // at::vec's portable 32-byte Vectorized, vectorised by the compiler
#endif
  return k;
}
#undef CLIPFAST_FILL

// A sysfs cache size ("512K", "32768K", "1M") in bytes, 0 if unreadable.
int64_t parse_size(const std::string& text) {
  int64_t value = 0;
  size_t i = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') value = value * 10 + (text[i++] - '0');
  if (i < text.size() && (text[i] == 'K' || text[i] == 'k')) value <<= 10;
  if (i < text.size() && (text[i] == 'M' || text[i] == 'm')) value <<= 20;
  return value;
}

std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// cpu0's level-`level` data (or unified) cache from sysfs: Linux on x86 and ARM alike.
int64_t sysfs_cache(int level) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string lvl = read_line(dir + "level");
    if (lvl.empty()) break;
    const std::string type = read_line(dir + "type");
    if (std::stoi(lvl) == level && (type == "Data" || type == "Unified")) return parse_size(read_line(dir + "size"));
  }
  return 0;
}

int64_t sysconf_cache(int name) {
  const long value = sysconf(name);
  return value > 0 ? value : 0;
}

CacheSizes detect_caches() {
  CacheSizes c{sysfs_cache(1), sysfs_cache(2)};
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
  if (c.l1d <= 0) c.l1d = sysconf_cache(_SC_LEVEL1_DCACHE_SIZE);
  if (c.l2 <= 0) c.l2 = sysconf_cache(_SC_LEVEL2_CACHE_SIZE);
#endif
  // Defaults no smaller than any current server core's: 32 KiB L1d, 512 KiB L2.
  if (c.l1d <= 0) c.l1d = 32 << 10;
  if (c.l2 <= 0) c.l2 = 512 << 10;
  return c;
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k = choose();
  return k;
}

const CacheSizes& cache_sizes() {
  static const CacheSizes c = detect_caches();
  return c;
}

}  // namespace clipfast::cpu

// The level in use, for the benchmark's machine line (read through ctypes: a plain C symbol, not an op).
extern "C" __attribute__((visibility("default"))) const char* clipfast_cpu_level() {
  return clipfast::cpu::kernels().level;
}
