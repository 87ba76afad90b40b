// The device backend's kernels, compiled for the host against the emulator's
// built-ins (build.rs puts worker/src/model/backend/ops on the include path), and a
// table of them by name, as a GPU module's lookup finds them: each entry calls its
// kernel with CUDA's `kernelParams` convention (an array of pointers to the
// arguments) and reports its signature, so that callers' argument lists are checked.
#include "cuda_emu.h"
#include "kernels.cu"

#ifndef EMU_LISTING
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

namespace {

template <typename T> std::string element_code() {
  using E = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<E, float>) return "f32";
  else if constexpr (std::is_same_v<E, double>) return "f64";
  else if constexpr (std::is_same_v<E, __half>) return "f16";
  else if constexpr (std::is_same_v<E, __nv_bfloat16>) return "bf16";
  else if constexpr (std::is_same_v<E, uint32_t>) return "u32";
  else if constexpr (std::is_same_v<E, uint64_t>) return "u64";
  else static_assert(sizeof(T) == 0, "a kernel parameter of a type the table cannot name");
}

template <typename T> std::string param_code() {
  if constexpr (std::is_pointer_v<T>) return "*" + element_code<std::remove_pointer_t<T>>();
  else return element_code<T>();
}

template <typename... A> std::string signature(void (*)(A...)) {
  std::string s;
  ((s += (s.empty() ? "" : ",") + param_code<A>()), ...);
  return s;
}

template <typename... A, size_t... I>
void call_with(void (*f)(A...), void **params, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<A> *>(params[I])...);
}

template <typename... A> void call(void (*f)(A...), void **params) {
  call_with(f, params, std::index_sequence_for<A...>{});
}

struct Entry {
  const char *name;
  void (*call)(void **);
  std::string (*signature)();
};

#define ENTRY(name) {#name, [](void **p) { call(name, p); }, [] { return signature(name); }},
const Entry ENTRIES[] = {
#include "kernel_table.inc"
};

const Entry *find(const char *name) {
  for (const Entry &e : ENTRIES)
    if (strcmp(e.name, name) == 0) return &e;
  return nullptr;
}

}  // namespace

// The kernel `name`'s entry (called with a `void **` of arguments), or null.
extern "C" void (*emu_kernel(const char *name))(void **) {
  const Entry *e = find(name);
  return e ? e->call : nullptr;
}

// Copies the kernel's signature (`*f16,*f32,u32,...`) into `out`, NUL-terminated;
// returns its length, or -1 for no such kernel.
extern "C" int emu_kernel_signature(const char *name, char *out, size_t out_len) {
  const Entry *e = find(name);
  if (!e) return -1;
  std::string s = e->signature();
  if (out_len > 0) {
    size_t n = s.size() < out_len - 1 ? s.size() : out_len - 1;
    memcpy(out, s.data(), n);
    out[n] = 0;
  }
  return (int)s.size();
}

// Every kernel's name, one per line, into `out`; returns the full length.
extern "C" int emu_kernel_names(char *out, size_t out_len) {
  std::string all;
  for (const Entry &e : ENTRIES) (all += e.name) += "\n";
  if (out_len > 0) {
    size_t n = all.size() < out_len - 1 ? all.size() : out_len - 1;
    memcpy(out, all.data(), n);
    out[n] = 0;
  }
  return (int)all.size();
}
#endif
