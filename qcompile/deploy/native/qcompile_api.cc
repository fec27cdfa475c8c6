// The C API of qcompile.h over TVM's runtime (libtvm_ffi, libtvm_runtime): a model.so is a Relax
// VM executable; it is loaded, its VM initialised on the CPU, and driven through set_input /
// invoke_stateful / get_output, as qcompile/runtime.py does from Python.
//
// libtvm_ffi is linked; libtvm_runtime (which registers the loader of VM executables) is opened
// at qc_load from this library's own directory, so that a bundle without it is an error code
// and a message, not a process that cannot start. Every entry point catches everything.

#include "qcompile.h"

#include <dlfcn.h>
#include <unistd.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/string.h>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

#include <chrono>
#include <memory>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "sha256.h"

namespace ffi = tvm::ffi;

namespace {

thread_local std::string last_error;

struct Failure {
  qc_status status;
  std::string message;
};

[[noreturn]] void Fail(qc_status status, const std::string& message) {
  throw Failure{status, message};
}

struct Tensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  size_t bytes = 0;
  DLDataType dl{};
};

}  // namespace

struct qc_model {
  std::string dir;
  std::vector<Tensor> inputs, outputs;
  ffi::Optional<ffi::Module> library, vm;
  ffi::Optional<ffi::Function> set_input, invoke, get_output, get_arity;
  std::vector<ffi::Tensor> staged;   // each input's tensor, filled by qc_set_input
  std::vector<bool> set;
  std::vector<ffi::Tensor> results;  // of the last run
  bool ran = false;
};

namespace {

const char* kArch =
#if defined(__aarch64__)
    "aarch64";
#elif defined(__x86_64__)
    "x86_64";
#elif defined(__arm__)
    "arm";
#else
    "unknown";
#endif

std::string ReadText(const std::string& path, qc_status status, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail(status, "cannot read " + path + " (" + what + ")");
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

ffi::Any Get(const ffi::json::Object& object, const char* key, const std::string& where) {
  auto value = object.Get(ffi::String(key));
  if (!value.has_value()) Fail(QC_ERR_BUNDLE, where + " has no '" + key + "'");
  return *value;
}

std::string GetString(const ffi::json::Object& object, const char* key,
                      const std::string& where) {
  auto value = Get(object, key, where).try_cast<ffi::String>();
  if (!value.has_value()) Fail(QC_ERR_BUNDLE, where + ": '" + key + "' is not a string");
  return std::string(*value);
}

bool ParseDtype(const std::string& name, DLDataType* out) {
  struct Entry { const char* name; uint8_t code; uint8_t bits; };
  static const Entry kTypes[] = {
      {"float32", kDLFloat, 32}, {"float16", kDLFloat, 16}, {"float64", kDLFloat, 64},
      {"int8", kDLInt, 8},       {"int16", kDLInt, 16},     {"int32", kDLInt, 32},
      {"int64", kDLInt, 64},     {"uint8", kDLUInt, 8},     {"uint16", kDLUInt, 16},
      {"bool", kDLBool, 8}};
  for (const Entry& e : kTypes) {
    if (name == e.name) {
      *out = DLDataType{e.code, e.bits, 1};
      return true;
    }
  }
  return false;
}

std::vector<Tensor> ParseTensors(const ffi::json::Object& manifest, const char* key) {
  std::vector<Tensor> tensors;
  auto list = Get(manifest, key, "model.json").try_cast<ffi::json::Array>();
  if (!list.has_value()) Fail(QC_ERR_BUNDLE, std::string("model.json: '") + key + "' is not a list");
  for (const ffi::Any& item : *list) {
    auto spec = item.try_cast<ffi::json::Object>();
    if (!spec.has_value()) Fail(QC_ERR_BUNDLE, std::string("model.json: bad entry in '") + key + "'");
    Tensor t;
    t.name = GetString(*spec, "name", "model.json");
    t.dtype = GetString(*spec, "dtype", "model.json");
    if (!ParseDtype(t.dtype, &t.dl)) Fail(QC_ERR_BUNDLE, "model.json: unknown dtype " + t.dtype);
    auto shape = Get(*spec, "shape", "model.json").try_cast<ffi::json::Array>();
    if (!shape.has_value() || shape->size() > QC_MAX_DIMS)
      Fail(QC_ERR_BUNDLE, "model.json: bad shape of " + t.name);
    t.bytes = (t.dl.bits + 7) / 8;
    for (const ffi::Any& d : *shape) {
      int64_t n = d.cast<int64_t>();
      t.shape.push_back(n);
      t.bytes *= static_cast<size_t>(n);
    }
    tensors.push_back(t);
  }
  return tensors;
}

// The architecture a target triple names ("aarch64-linux-gnu" -> "aarch64"), "" for none.
std::string TripleArch(const std::string& triple) {
  std::string arch = triple.substr(0, triple.find('-'));
  if (arch == "arm64") return "aarch64";
  if (arch.rfind("armv", 0) == 0) return "arm";
  return arch;
}

// Refuse a library built for another architecture or for instructions this CPU lacks (it
// would die of SIGILL in the first int8 kernel).
void CheckDevice(const ffi::json::Object& manifest) {
  auto target = Get(manifest, "target", "model.json").try_cast<ffi::json::Object>();
  if (!target.has_value()) return;
  ffi::json::Object cpu = *target;
  auto host = target->Get(ffi::String("host"));
  auto host_object = host.has_value() ? host->try_cast<ffi::json::Object>() : std::nullopt;
  auto inner = target->Get(ffi::String("target"));
  auto inner_object = inner.has_value() ? inner->try_cast<ffi::json::Object>() : std::nullopt;
  if (host_object.has_value()) cpu = *host_object;
  else if (inner_object.has_value()) cpu = *inner_object;
  std::string name = target->count(ffi::String("name")) ? GetString(*target, "name", "model.json")
                                                        : "?";
  auto triple = cpu.Get(ffi::String("mtriple"));
  if (triple.has_value() && triple->try_cast<ffi::String>().has_value()) {
    std::string arch = TripleArch(std::string(triple->cast<ffi::String>()));
    if (arch != kArch)
      Fail(QC_ERR_DEVICE, "the model was built for target '" + name + "' (" + arch +
                              "); this is " + kArch + ". Build it for this device (qcompile " +
                              "compile --target ...), or run it on an " + arch + " device.");
  }
#if defined(__aarch64__) && defined(__linux__)
  auto mattr = cpu.Get(ffi::String("mattr"));
  auto attrs = mattr.has_value() ? mattr->try_cast<ffi::json::Array>() : std::nullopt;
  if (!attrs.has_value()) return;
  unsigned long hwcap = getauxval(AT_HWCAP), hwcap2 = getauxval(AT_HWCAP2);
  for (const ffi::Any& a : *attrs) {
    auto attr = a.try_cast<ffi::String>();
    if (!attr.has_value()) continue;
    std::string s(*attr);
    bool missing = (s == "+dotprod" && !(hwcap & (1UL << 20))) ||  // HWCAP_ASIMDDP
                   (s == "+i8mm" && !(hwcap2 & (1UL << 13)));      // HWCAP2_I8MM
    if (missing)
      Fail(QC_ERR_DEVICE, "the model was built for target '" + name + "', whose int8 kernels use " +
                              s.substr(1) + ", which this CPU does not have. Build it for a " +
                              "target without it (qcompile targets lists them, e.g. arm64).");
  }
#endif
}

bool IsOpenCL(const ffi::json::Object& manifest) {
  auto target = Get(manifest, "target", "model.json").try_cast<ffi::json::Object>();
  if (!target.has_value()) return false;
  auto inner = target->Get(ffi::String("target"));
  auto object = inner.has_value() ? inner->try_cast<ffi::json::Object>() : std::nullopt;
  if (!object.has_value()) return false;
  auto kind = object->Get(ffi::String("kind"));
  return kind.has_value() && kind->try_cast<ffi::String>().has_value() &&
         std::string(kind->cast<ffi::String>()) == "opencl";
}

// The directory this library was loaded from (where the bundle's other libraries are).
std::string OwnDirectory() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&OwnDirectory), &info) && info.dli_fname) {
    std::string path(info.dli_fname);
    size_t slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
  }
  return ".";
}

void LoadRuntime() {
  static bool loaded = false;
  if (loaded) return;
  std::string here = OwnDirectory();
  std::string path = here + "/libtvm_runtime.so";
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (handle == nullptr) {
    std::string why = dlerror();
    handle = dlopen("libtvm_runtime.so", RTLD_NOW | RTLD_GLOBAL);  // installed elsewhere
    if (handle == nullptr)
      Fail(QC_ERR_RUNTIME, "the TVM runtime could not be loaded (" + why + "): a bundle has " +
                               "it in lib/ beside libqcompile.so; make the bundle again with " +
                               "`qcompile package`.");
  }
  loaded = true;
}

ffi::Function Method(const ffi::Module& module, const char* name) {
  ffi::Optional<ffi::Function> f = module->GetFunction(name, true);
  if (!f.has_value()) Fail(QC_ERR_RUNTIME, std::string("the runtime has no ") + name);
  return *f;
}

ffi::Function Global(const char* name) {
  ffi::Optional<ffi::Function> f = ffi::Function::GetGlobal(name);
  if (!f.has_value()) Fail(QC_ERR_RUNTIME, std::string("the runtime has no ") + name);
  return *f;
}

// Flatten the VM's outputs (nested tuples) in order.
void CollectOutputs(qc_model* m, std::vector<int64_t>& index, std::vector<ffi::Tensor>& out) {
  std::vector<ffi::AnyView> args;
  ffi::String main("main");
  args.push_back(main);
  for (int64_t& i : index) args.push_back(i);
  ffi::Any arity;
  m->get_arity.value().CallPacked(ffi::PackedArgs(args.data(), static_cast<int32_t>(args.size())), &arity);
  if (arity.cast<int>() == -1) {
    ffi::Any value;
    m->get_output.value().CallPacked(ffi::PackedArgs(args.data(), static_cast<int32_t>(args.size())), &value);
    out.push_back(value.cast<ffi::Tensor>());
    return;
  }
  for (int64_t i = 0; i < arity.cast<int>(); ++i) {
    index.push_back(i);
    CollectOutputs(m, index, out);
    index.pop_back();
  }
}

void RunOnce(qc_model* m) {
  m->invoke.value()("main");
}

template <typename F>
qc_status Guard(F&& body) {
  try {
    body();
    last_error.clear();
    return QC_OK;
  } catch (const Failure& f) {
    last_error = f.message;
    return f.status;
  } catch (const ffi::Error& e) {
    std::string message = e.message();
    last_error = "the TVM runtime failed: " + e.kind() + ": " + message.substr(0, message.find('\n'));
    return QC_ERR_RUNTIME;
  } catch (const std::exception& e) {
    last_error = std::string("the TVM runtime failed: ") + e.what();
    return QC_ERR_RUNTIME;
  } catch (...) {
    last_error = "the TVM runtime failed with an unknown exception";
    return QC_ERR_RUNTIME;
  }
}

}  // namespace

extern "C" {

const char* qc_last_error(void) { return last_error.c_str(); }

qc_status qc_load(const char* dir, int num_threads, qc_model** out) {
  return Guard([&] {
    if (dir == nullptr || out == nullptr) Fail(QC_ERR_ARGUMENT, "qc_load: dir and out must not be null");
    if (num_threads < 0) Fail(QC_ERR_ARGUMENT, "qc_load: num_threads must be 0 or more");
    *out = nullptr;
    std::string root(dir);
    std::string text = ReadText(root + "/model.json", QC_ERR_BUNDLE,
                                "the manifest qcompile writes beside model.so; is this a bundle?");
    ffi::String error;
    ffi::Any parsed = ffi::json::Parse(ffi::String(text), &error);
    auto manifest = parsed.try_cast<ffi::json::Object>();
    if (!error.empty() || !manifest.has_value())
      Fail(QC_ERR_BUNDLE, root + "/model.json is not valid JSON: " + std::string(error));
    auto library = Get(*manifest, "library", "model.json").try_cast<ffi::json::Object>();
    if (!library.has_value()) Fail(QC_ERR_BUNDLE, "model.json: 'library' is not an object");
    std::string file = root + "/" + GetString(*library, "file", "model.json library");
    std::string expected = GetString(*library, "sha256", "model.json library");
    std::string bytes = ReadText(file, QC_ERR_BUNDLE, "the compiled model");
    std::string actual = qcompile::Sha256Hex(bytes.data(), bytes.size());
    if (actual != expected)
      Fail(QC_ERR_INTEGRITY, file + " is not the library model.json describes (its sha256 is " +
                                 actual.substr(0, 12) + "..., the manifest says " +
                                 expected.substr(0, 12) + "...): it was replaced or damaged. " +
                                 "Copy the bundle again, or rebuild it.");
    CheckDevice(*manifest);
    auto model = std::make_unique<qc_model>();
    model->dir = root;
    model->inputs = ParseTensors(*manifest, "inputs");
    model->outputs = ParseTensors(*manifest, "outputs");
    model->set.assign(model->inputs.size(), false);
    // The runtime sizes its thread pool from TVM_NUM_THREADS; unset, it re-reads the CPU count
    // at every kernel launch (measured: 0.038 vs 0.013 ms a run of a small model), so it is
    // set to the count the runtime would choose (half the CPUs on x86_64) when not given.
    if (num_threads > 0) {
      setenv("TVM_NUM_THREADS", std::to_string(num_threads).c_str(), 1);
    } else if (getenv("TVM_NUM_THREADS") == nullptr) {
      long cpus = sysconf(_SC_NPROCESSORS_ONLN);
#if defined(__x86_64__)
      cpus /= 2;
#endif
      setenv("TVM_NUM_THREADS", std::to_string(cpus > 0 ? cpus : 1).c_str(), 1);
    }
    LoadRuntime();
    model->library = ffi::Module::LoadFromFile(file);
    ffi::Module vm = Method(model->library.value(), "vm_load_executable")().cast<ffi::Module>();
    const int kPooledAllocator = 2;
    if (IsOpenCL(*manifest))  // the GPU, and the CPU that drives it
      Method(vm, "vm_initialization")(static_cast<int>(kDLOpenCL), 0, kPooledAllocator,
                                      static_cast<int>(kDLCPU), 0, kPooledAllocator);
    else
      Method(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    model->vm = vm;
    model->set_input = Method(vm, "set_input");
    model->invoke = Method(vm, "invoke_stateful");
    model->get_output = Method(vm, "get_output");
    model->get_arity = Method(vm, "get_output_arity");
    ffi::Function alloc = Global("runtime.TVMTensorAllocWithScope");
    for (const Tensor& t : model->inputs)
      model->staged.push_back(alloc(ffi::Shape(t.shape), t.dl, DLDevice{kDLCPU, 0},
                                    ffi::Optional<ffi::String>()).cast<ffi::Tensor>());
    *out = model.release();
  });
}

int qc_num_inputs(const qc_model* model) { return model ? static_cast<int>(model->inputs.size()) : 0; }

int qc_num_outputs(const qc_model* model) { return model ? static_cast<int>(model->outputs.size()) : 0; }

static qc_status Info(const std::vector<Tensor>* tensors, int index, qc_tensor_info* info) {
  return Guard([&] {
    if (tensors == nullptr || info == nullptr) Fail(QC_ERR_ARGUMENT, "model and info must not be null");
    if (index < 0 || index >= static_cast<int>(tensors->size()))
      Fail(QC_ERR_ARGUMENT, "index " + std::to_string(index) + " out of range (the model has " +
                                std::to_string(tensors->size()) + ")");
    const Tensor& t = (*tensors)[index];
    info->name = t.name.c_str();
    info->dtype = t.dtype.c_str();
    info->ndim = static_cast<int>(t.shape.size());
    for (size_t i = 0; i < t.shape.size(); ++i) info->shape[i] = t.shape[i];
    info->bytes = t.bytes;
  });
}

qc_status qc_input_info(const qc_model* model, int index, qc_tensor_info* info) {
  return Info(model ? &model->inputs : nullptr, index, info);
}

qc_status qc_output_info(const qc_model* model, int index, qc_tensor_info* info) {
  return Info(model ? &model->outputs : nullptr, index, info);
}

qc_status qc_set_input(qc_model* model, const char* name, const void* data, size_t bytes) {
  return Guard([&] {
    if (model == nullptr || name == nullptr || data == nullptr)
      Fail(QC_ERR_ARGUMENT, "qc_set_input: model, name and data must not be null");
    size_t index = 0;
    while (index < model->inputs.size() && model->inputs[index].name != name) ++index;
    if (index == model->inputs.size()) {
      std::string names;
      for (const Tensor& t : model->inputs) names += (names.empty() ? "" : ", ") + t.name;
      Fail(QC_ERR_INPUT, std::string("the model has no input '") + name + "'; its inputs are: " + names);
    }
    const Tensor& t = model->inputs[index];
    if (bytes != t.bytes) {
      std::string shape;
      for (int64_t d : t.shape) shape += (shape.empty() ? "" : ",") + std::to_string(d);
      Fail(QC_ERR_INPUT, "input '" + t.name + "' takes " + std::to_string(t.bytes) + " bytes (" +
                             t.dtype + " [" + shape + "]), not " + std::to_string(bytes));
    }
    Global("runtime.TVMTensorCopyFromBytes")(
        const_cast<DLTensor*>(model->staged[index].GetDLTensorPtr()), const_cast<void*>(data),
        bytes);
    model->set[index] = true;
  });
}

qc_status qc_run(qc_model* model) {
  return Guard([&] {
    if (model == nullptr) Fail(QC_ERR_ARGUMENT, "qc_run: model must not be null");
    for (size_t i = 0; i < model->inputs.size(); ++i)
      if (!model->set[i])
        Fail(QC_ERR_INPUT, "input '" + model->inputs[i].name + "' was not set (qc_set_input)");
    std::vector<ffi::AnyView> args;
    ffi::String main("main");
    args.push_back(main);
    for (const ffi::Tensor& t : model->staged) args.push_back(t);
    ffi::Any rv;
    model->set_input.value().CallPacked(ffi::PackedArgs(args.data(), static_cast<int32_t>(args.size())), &rv);
    RunOnce(model);
    std::vector<int64_t> index;
    model->results.clear();
    CollectOutputs(model, index, model->results);
    if (model->results.size() != model->outputs.size())
      Fail(QC_ERR_RUNTIME, "the model returned " + std::to_string(model->results.size()) +
                               " outputs; its manifest lists " + std::to_string(model->outputs.size()));
    model->ran = true;
  });
}

qc_status qc_get_output(qc_model* model, int index, void* data, size_t bytes) {
  return Guard([&] {
    if (model == nullptr || data == nullptr) Fail(QC_ERR_ARGUMENT, "qc_get_output: model and data must not be null");
    if (!model->ran) Fail(QC_ERR_ARGUMENT, "qc_get_output: run the model first (qc_run)");
    if (index < 0 || index >= static_cast<int>(model->outputs.size()))
      Fail(QC_ERR_ARGUMENT, "output " + std::to_string(index) + " out of range (the model has " +
                                std::to_string(model->outputs.size()) + ")");
    const Tensor& t = model->outputs[index];
    if (bytes != t.bytes)
      Fail(QC_ERR_ARGUMENT, "output '" + t.name + "' is " + std::to_string(t.bytes) +
                                " bytes, not " + std::to_string(bytes));
    Global("runtime.TVMTensorCopyToBytes")(
        const_cast<DLTensor*>(model->results[index].GetDLTensorPtr()), data, bytes);
  });
}

qc_status qc_benchmark(qc_model* model, int runs, double* times_ms) {
  return Guard([&] {
    if (model == nullptr || times_ms == nullptr || runs < 1)
      Fail(QC_ERR_ARGUMENT, "qc_benchmark: model and times_ms must not be null, runs at least 1");
    if (!model->ran) Fail(QC_ERR_ARGUMENT, "qc_benchmark: run the model once first (qc_run)");
    for (int i = 0; i < runs; ++i) {
      auto start = std::chrono::steady_clock::now();
      RunOnce(model);
      std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
      times_ms[i] = took.count();
    }
  });
}

void qc_free(qc_model* model) { delete model; }

}  // extern "C"
