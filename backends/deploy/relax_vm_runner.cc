// relax_vm_runner: run a hyq-fx TVM Relax VM library (`hyq-fx export OUT --to tvm`) on one batch.
//
//   relax_vm_runner LIBRARY.so INPUT.f32 N,C,H,W OUTPUT.f32 [--repeat R]
//
// INPUT.f32 holds the images as raw little-endian float32 in NCHW order, exactly N*C*H*W of
// them. The library's `main` runs R times (default 1) on the CPU; the logits of the last run
// are written to OUTPUT.f32 as raw float32 (row-major), and stdout gets two lines:
//
//   output_shape N,K
//   run_ms FIRST MEAN     (milliseconds: the first run, and the mean of all R runs)
//
// Any error is one line on stderr starting with "relax_vm_runner: " and a non-zero exit status
// (2: bad arguments or files, 3: TVM could not load or run the library).
//
// Only TVM's runtime is needed: libtvm_ffi.so (modules, functions, tensors) and libtvm_runtime.so
// (the Relax VM and the symbols the library's kernels call). Nothing here calls the latter by
// name, so it must be linked with -Wl,--no-as-needed (the Makefile does).

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <new>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace ffi = tvm::ffi;
using ffi::Tensor;

constexpr int kExitUsage = 2;
constexpr int kExitTvm = 3;
// vm_initialization's allocator codes (python: tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR)
constexpr int kPooledAllocator = 2;
constexpr DLDevice kCpu{kDLCPU, 0};
constexpr DLDataType kFloat32{kDLFloat, 32, 1};
constexpr size_t kAlignment = 64;  // TVM's kAllocAlignment: kernels may assume it

// Bad arguments or files (exit 2).
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A library that loads but is not what the runner runs (exit 3, as TVM's own errors).
struct LibraryError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Host memory for ffi::Tensor::FromNDAlloc, aligned as TVM's own CPU allocations.
struct AlignedHostAlloc {
  void AllocData(DLTensor* tensor) {
    size_t bytes = (ffi::GetDataSize(*tensor) + kAlignment - 1) / kAlignment * kAlignment;
    if (posix_memalign(&tensor->data, kAlignment, bytes ? bytes : kAlignment) != 0) {
      throw std::bad_alloc();
    }
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

struct Options {
  std::string library, input, output;
  std::vector<int64_t> shape;
  int repeat = 1;
};

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    char* end = nullptr;
    long long dim = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || dim <= 0) {
      throw UsageError("bad shape '" + text + "': want positive integers such as 1,3,128,128");
    }
    shape.push_back(dim);
  }
  if (shape.empty()) throw UsageError("empty shape");
  return shape;
}

Options ParseArgs(int argc, char** argv) {
  if (argc != 5 && !(argc == 7 && std::string(argv[5]) == "--repeat")) {
    throw UsageError("usage: relax_vm_runner LIBRARY.so INPUT.f32 N,C,H,W OUTPUT.f32 [--repeat R]");
  }
  Options options{argv[1], argv[2], argv[4], ParseShape(argv[3])};
  if (argc == 7) {
    options.repeat = std::atoi(argv[6]);
    if (options.repeat < 1) throw UsageError("--repeat wants a positive integer");
  }
  return options;
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

std::string JoinShape(const std::vector<int64_t>& shape) {
  std::string text;
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? "," : "") + std::to_string(shape[i]);
  return text;
}

std::vector<float> ReadFloats(const std::string& path, int64_t count) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw UsageError("cannot read " + path);
  const int64_t bytes = static_cast<int64_t>(file.tellg());
  if (bytes != count * static_cast<int64_t>(sizeof(float))) {
    throw UsageError(path + " holds " + std::to_string(bytes) + " bytes; the shape needs " +
                     std::to_string(count * sizeof(float)) + " (float32)");
  }
  std::vector<float> values(count);
  file.seekg(0);
  file.read(reinterpret_cast<char*>(values.data()), bytes);
  return values;
}

void WriteFloats(const std::string& path, const std::vector<float>& values) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  if (!file) throw UsageError("cannot write " + path);
}

// An absolute path: dlopen searches the library path for a name without '/'.
std::string AbsolutePath(const std::string& path) {
  char* resolved = realpath(path.c_str(), nullptr);
  if (resolved == nullptr) throw UsageError("cannot find " + path);
  std::string absolute(resolved);
  std::free(resolved);
  return absolute;
}

// The Relax VM over the library, set up as tvm.runtime.vm.VirtualMachine(lib, tvm.cpu()) does.
ffi::Function LoadMain(const std::string& library) {
  ffi::Module lib = ffi::Module::LoadFromFile(AbsolutePath(library));
  ffi::Optional<ffi::Function> load = lib->GetFunction("vm_load_executable");
  if (!load.has_value()) throw LibraryError(library + " is not a TVM Relax VM library");
  ffi::Module vm = (*load)().cast<ffi::Module>();
  vm->GetFunction("vm_initialization")
      .value()(static_cast<int>(kCpu.device_type), kCpu.device_id, kPooledAllocator);
  ffi::Optional<ffi::Function> main = vm->GetFunction("main");
  if (!main.has_value()) throw LibraryError(library + " has no Relax function 'main'");
  return *main;
}

// The logits: the returned tensor, or the first one of a (nested) tuple of outputs.
Tensor FirstTensor(ffi::Any out) {
  while (auto tuple = out.as<ffi::Array<ffi::Any>>()) {
    if (tuple->empty()) break;
    out = (*tuple)[0];
  }
  std::optional<Tensor> tensor = out.try_cast<Tensor>();
  if (!tensor.has_value()) throw LibraryError("'main' returned no tensor");
  return *tensor;
}

std::vector<float> ToFloats(const Tensor& tensor, std::vector<int64_t>* shape) {
  DLDataType dtype = tensor.dtype();
  if (dtype.code != kDLFloat || dtype.bits != 32 || dtype.lanes != 1) {
    throw LibraryError("'main' returned a non-float32 tensor");
  }
  if (tensor.device().device_type != kDLCPU || !tensor.IsContiguous()) {
    throw LibraryError("'main' returned a tensor that is not contiguous in host memory");
  }
  ffi::ShapeView dims = tensor.shape();
  shape->assign(dims.begin(), dims.end());
  std::vector<float> values(tensor.numel());
  std::memcpy(values.data(), static_cast<const char*>(tensor.data_ptr()) + tensor.byte_offset(),
              values.size() * sizeof(float));
  return values;
}

double MillisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

int Run(const Options& options) {
  std::vector<float> images = ReadFloats(options.input, NumElements(options.shape));
  ffi::Function main = LoadMain(options.library);
  Tensor input = Tensor::FromNDAlloc(AlignedHostAlloc(), ffi::Shape(options.shape), kFloat32, kCpu);
  std::memcpy(input.data_ptr(), images.data(), images.size() * sizeof(float));

  ffi::Any out;
  double first_ms = 0, total_ms = 0;
  for (int i = 0; i < options.repeat; ++i) {
    auto start = std::chrono::steady_clock::now();
    out = main(input);
    double ms = MillisecondsSince(start);
    if (i == 0) first_ms = ms;
    total_ms += ms;
  }
  std::vector<int64_t> out_shape;
  WriteFloats(options.output, ToFloats(FirstTensor(out), &out_shape));
  std::printf("output_shape %s\n", JoinShape(out_shape).c_str());
  std::printf("run_ms %.3f %.3f\n", first_ms, total_ms / options.repeat);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(ParseArgs(argc, argv));
  } catch (const UsageError& err) {
    std::cerr << "relax_vm_runner: " << err.what() << "\n";
    return kExitUsage;
  } catch (const tvm::ffi::Error& err) {
    std::cerr << "relax_vm_runner: TVM " << err.kind() << ": " << err.message() << "\n";
    return kExitTvm;
  } catch (const std::exception& err) {
    std::cerr << "relax_vm_runner: " << err.what() << "\n";
    return kExitTvm;
  }
}
