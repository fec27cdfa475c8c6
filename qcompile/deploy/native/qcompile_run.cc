// qcompile-run: run a bundle's model without Python, like `qcompile run`.
//
//   qcompile-run BUNDLE [--inputs X.npz|X.npy] [--output Y.npz] [--repeat N] [--threads T]
//
// Reads the inputs from an .npz (np.savez: one array per input, by name) or, for a model with
// one input, an .npy; without --inputs, random data of the right shapes. Prints the latency
// (mean, median, p90 over --repeat runs) and the process's peak resident memory; saves the
// outputs to an .npz. libqcompile.so is opened from the bundle's lib/ (beside bin/), so that a
// bundle missing a library is a message and exit code 2, as every other error is.

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "qcompile.h"

namespace {

struct Api {
  decltype(&qc_load) load;
  decltype(&qc_num_inputs) num_inputs;
  decltype(&qc_num_outputs) num_outputs;
  decltype(&qc_input_info) input_info;
  decltype(&qc_output_info) output_info;
  decltype(&qc_set_input) set_input;
  decltype(&qc_run) run;
  decltype(&qc_get_output) get_output;
  decltype(&qc_benchmark) benchmark;
  decltype(&qc_last_error) last_error;
  decltype(&qc_free) free;
};

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string Here() {
  char path[4096];
  ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
  if (n <= 0) return ".";
  path[n] = '\0';
  std::string s(path);
  return s.substr(0, s.rfind('/'));
}

template <typename T>
void Bind(void* lib, const char* name, T* slot) {
  void* symbol = dlsym(lib, name);
  if (symbol == nullptr) throw Error(std::string("libqcompile.so has no ") + name);
  *slot = reinterpret_cast<T>(symbol);
}

Api OpenApi() {
  std::string path = Here() + "/../lib/libqcompile.so";
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr)
    throw Error(std::string("cannot load the bundle's libraries (") + dlerror() +
                "): run qcompile-run from its bundle (BUNDLE/bin), whose lib/ holds " +
                "libqcompile.so, libtvm_ffi.so and libtvm_runtime.so; make the bundle again " +
                "with `qcompile package` if one is missing.");
  Api api{};
  Bind(lib, "qc_load", &api.load);
  Bind(lib, "qc_num_inputs", &api.num_inputs);
  Bind(lib, "qc_num_outputs", &api.num_outputs);
  Bind(lib, "qc_input_info", &api.input_info);
  Bind(lib, "qc_output_info", &api.output_info);
  Bind(lib, "qc_set_input", &api.set_input);
  Bind(lib, "qc_run", &api.run);
  Bind(lib, "qc_get_output", &api.get_output);
  Bind(lib, "qc_benchmark", &api.benchmark);
  Bind(lib, "qc_last_error", &api.last_error);
  Bind(lib, "qc_free", &api.free);
  return api;
}

// ---- .npy and .npz (numpy's formats) ----------------------------------------------------

struct Array {
  std::string dtype;  // numpy name: float32, int64, ...
  std::vector<int64_t> shape;
  std::vector<char> data;
};

const std::map<std::string, std::string>& Descrs() {
  static const std::map<std::string, std::string> m = {
      {"<f4", "float32"}, {"<f2", "float16"}, {"<f8", "float64"}, {"|i1", "int8"},
      {"<i2", "int16"},   {"<i4", "int32"},   {"<i8", "int64"},   {"|u1", "uint8"},
      {"<u2", "uint16"},  {"|b1", "bool"}};
  return m;
}

Array ParseNpy(const std::string& bytes, const std::string& where) {
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0)
    throw Error(where + " is not an .npy array (numpy.save writes them)");
  int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len, start;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | static_cast<unsigned char>(bytes[9]) << 8;
    start = 10;
  } else {
    header_len = 0;
    for (int i = 0; i < 4; ++i) header_len |= size_t(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    start = 12;
  }
  std::string header = bytes.substr(start, header_len);
  auto field = [&](const std::string& key) {
    size_t at = header.find("'" + key + "'");
    if (at == std::string::npos) throw Error(where + ": .npy header has no " + key);
    return header.substr(header.find(':', at) + 1);
  };
  std::string descr = field("descr");
  descr = descr.substr(descr.find('\'') + 1);
  descr = descr.substr(0, descr.find('\''));
  auto known = Descrs().find(descr);
  if (known == Descrs().end())
    throw Error(where + ": arrays of dtype " + descr + " are not supported (little-endian " +
                "float/int/uint/bool ones are)");
  if (field("fortran_order").find("True") < field("fortran_order").find(','))
    throw Error(where + " is in Fortran order: save it C-contiguous (numpy.ascontiguousarray)");
  std::string shape_text = field("shape");
  shape_text = shape_text.substr(shape_text.find('(') + 1);
  shape_text = shape_text.substr(0, shape_text.find(')'));
  Array array;
  array.dtype = known->second;
  std::stringstream ss(shape_text);
  std::string dim;
  while (std::getline(ss, dim, ','))
    if (dim.find_first_of("0123456789") != std::string::npos) array.shape.push_back(std::stoll(dim));
  array.data.assign(bytes.begin() + start + header_len, bytes.end());
  return array;
}

uint64_t Le(const std::string& b, size_t at, int n) {
  if (at + n > b.size()) throw Error("truncated .npz");
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= uint64_t(static_cast<unsigned char>(b[at + i])) << (8 * i);
  return v;
}

// The entries of an .npz (a zip of .npy files, stored as np.savez writes them), read through
// the zip's central directory (zip64 included).
std::map<std::string, Array> ParseNpz(const std::string& z, const std::string& where) {
  size_t eocd = std::string::npos;
  for (size_t i = z.size() >= 22 ? z.size() - 21 : 0; i-- > 0;) {
    if (Le(z, i, 4) == 0x06054b50) { eocd = i; break; }
  }
  if (eocd == std::string::npos) throw Error(where + " is not an .npz (no zip directory)");
  uint64_t count = Le(z, eocd + 10, 2), offset = Le(z, eocd + 16, 4);
  if (eocd >= 20 && Le(z, eocd - 20, 4) == 0x07064b50) {  // zip64 end-of-directory locator
    uint64_t record = Le(z, eocd - 20 + 8, 8);
    count = Le(z, record + 32, 8);
    offset = Le(z, record + 48, 8);
  }
  std::map<std::string, Array> arrays;
  size_t at = offset;
  for (uint64_t e = 0; e < count; ++e) {
    if (Le(z, at, 4) != 0x02014b50) throw Error(where + ": damaged zip directory");
    uint64_t method = Le(z, at + 10, 2), compressed = Le(z, at + 20, 4),
             size = Le(z, at + 24, 4), name_len = Le(z, at + 28, 2),
             extra_len = Le(z, at + 30, 2), comment_len = Le(z, at + 32, 2),
             local = Le(z, at + 42, 4);
    std::string name = z.substr(at + 46, name_len);
    size_t extra = at + 46 + name_len, extra_end = extra + extra_len;
    while (extra + 4 <= extra_end) {  // zip64: the 64-bit values of the 0xFFFFFFFF fields
      uint64_t id = Le(z, extra, 2), len = Le(z, extra + 2, 2);
      size_t p = extra + 4;
      if (id == 0x0001) {
        if (size == 0xFFFFFFFF) { size = Le(z, p, 8); p += 8; }
        if (compressed == 0xFFFFFFFF) { compressed = Le(z, p, 8); p += 8; }
        if (local == 0xFFFFFFFF) { local = Le(z, p, 8); }
      }
      extra += 4 + len;
    }
    if (method != 0)
      throw Error(where + " is compressed: save it with numpy.savez, not savez_compressed");
    size_t data = local + 30 + Le(z, local + 26, 2) + Le(z, local + 28, 2);
    if (data + size > z.size()) throw Error("truncated .npz: " + where);
    std::string key = name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0
                          ? name.substr(0, name.size() - 4) : name;
    arrays[key] = ParseNpy(z.substr(data, size), where + ":" + key);
    at += 46 + name_len + extra_len + comment_len;
  }
  return arrays;
}

uint32_t Crc32(const char* data, size_t n) {
  static uint32_t table[256];
  static bool ready = false;
  if (!ready) {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    ready = true;
  }
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ static_cast<unsigned char>(data[i])) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

std::string Npy(const std::string& dtype, const std::vector<int64_t>& shape, const char* data,
                size_t bytes) {
  std::string descr;
  for (const auto& kv : Descrs())
    if (kv.second == dtype) descr = kv.first;
  std::string dims;
  for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) dims += ",";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xFF);
  out += static_cast<char>(header.size() >> 8);
  return out + header + std::string(data, bytes);
}

void Put(std::string& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b += static_cast<char>((v >> (8 * i)) & 0xFF);
}

void WriteNpz(const std::string& path, const std::vector<std::pair<std::string, std::string>>& files) {
  std::string out, directory;
  for (const auto& [name, body] : files) {
    std::string entry = name + ".npy";
    uint32_t crc = Crc32(body.data(), body.size());
    size_t offset = out.size();
    Put(out, 0x04034b50, 4); Put(out, 20, 2); Put(out, 0, 2); Put(out, 0, 2); Put(out, 0, 4);
    Put(out, crc, 4); Put(out, body.size(), 4); Put(out, body.size(), 4);
    Put(out, entry.size(), 2); Put(out, 0, 2);
    out += entry + body;
    Put(directory, 0x02014b50, 4); Put(directory, 20, 2); Put(directory, 20, 2);
    Put(directory, 0, 2); Put(directory, 0, 2); Put(directory, 0, 4); Put(directory, crc, 4);
    Put(directory, body.size(), 4); Put(directory, body.size(), 4);
    Put(directory, entry.size(), 2); Put(directory, 0, 2); Put(directory, 0, 2);
    Put(directory, 0, 2); Put(directory, 0, 2); Put(directory, 0, 4); Put(directory, offset, 4);
    directory += entry;
  }
  size_t start = out.size();
  out += directory;
  Put(out, 0x06054b50, 4); Put(out, 0, 2); Put(out, 0, 2); Put(out, files.size(), 2);
  Put(out, files.size(), 2); Put(out, directory.size(), 4); Put(out, start, 4); Put(out, 0, 2);
  std::ofstream f(path, std::ios::binary);
  if (!f.write(out.data(), out.size())) throw Error("cannot write " + path);
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("inputs file '" + path + "' does not exist or cannot be read");
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::string Describe(const qc_tensor_info& info) {
  std::string shape;
  for (int i = 0; i < info.ndim; ++i) shape += (i ? "," : "") + std::to_string(info.shape[i]);
  return std::string(info.name) + " " + info.dtype + "[" + shape + "]";
}

double PeakRssMb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0.0;
}

void RandomFill(const qc_tensor_info& info, std::vector<char>& buffer, std::mt19937& rng) {
  buffer.assign(info.bytes, 0);
  std::string dtype(info.dtype);
  std::normal_distribution<float> normal;
  if (dtype == "float32") {
    float* p = reinterpret_cast<float*>(buffer.data());
    for (size_t i = 0; i < info.bytes / 4; ++i) p[i] = normal(rng);
  } else {
    for (char& c : buffer) c = static_cast<char>(rng() & 1);  // 0/1 in the low byte
  }
}

int Usage() {
  std::fprintf(stderr,
               "usage: qcompile-run BUNDLE [--inputs X.npz|X.npy] [--output Y.npz] "
               "[--repeat N] [--threads T]\n");
  return 2;
}

int Main(int argc, char** argv) {
  if (argc < 2) return Usage();
  std::string bundle = argv[1], inputs_path, output_path;
  int repeat = 20, threads = 0;
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Error(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--inputs") inputs_path = value();
    else if (arg == "--output") output_path = value();
    else if (arg == "--repeat") repeat = std::atoi(value().c_str());
    else if (arg == "--threads") threads = std::atoi(value().c_str());
    else if (arg == "-h" || arg == "--help") { Usage(); return 0; }
    else throw Error("unknown option '" + arg + "'");
  }
  if (repeat < 1 || threads < 0) throw Error("--repeat must be at least 1, --threads 0 or more");
  Api api = OpenApi();
  qc_model* model = nullptr;
  if (api.load(bundle.c_str(), threads, &model) != QC_OK) throw Error(api.last_error());
  std::vector<qc_tensor_info> ins(api.num_inputs(model)), outs(api.num_outputs(model));
  for (size_t i = 0; i < ins.size(); ++i) api.input_info(model, static_cast<int>(i), &ins[i]);
  for (size_t i = 0; i < outs.size(); ++i) api.output_info(model, static_cast<int>(i), &outs[i]);
  std::string expected;
  for (const auto& info : ins) expected += (expected.empty() ? "" : "; ") + Describe(info);
  std::map<std::string, Array> given;
  if (!inputs_path.empty()) {
    std::string bytes = ReadAll(inputs_path);
    if (bytes.compare(0, 6, "\x93NUMPY") == 0) {
      if (ins.size() != 1)
        throw Error("an .npy holds one array, and the model has " + std::to_string(ins.size()) +
                    " inputs: pass an .npz with one array per input: " + expected);
      given[ins[0].name] = ParseNpy(bytes, inputs_path);
    } else {
      given = ParseNpz(bytes, inputs_path);
    }
  } else {
    std::fprintf(stderr, "qcompile-run: no --inputs given: running on random data\n");
  }
  std::mt19937 rng(0);
  for (const auto& info : ins) {
    std::vector<char> buffer;
    if (inputs_path.empty()) {
      RandomFill(info, buffer, rng);
    } else {
      auto found = given.find(info.name);
      if (found == given.end())
        throw Error("'" + inputs_path + "' has no array '" + info.name + "'; the model's inputs: " +
                    expected);
      const Array& a = found->second;
      std::vector<int64_t> shape(info.shape, info.shape + info.ndim);
      if (a.dtype != info.dtype || a.shape != shape) {
        std::string dims;
        for (int64_t d : a.shape) dims += (dims.empty() ? "" : ",") + std::to_string(d);
        throw Error("input '" + std::string(info.name) + "' is " + a.dtype + "[" + dims +
                    "] in '" + inputs_path + "'; the model takes " + Describe(info));
      }
      buffer = a.data;
    }
    if (api.set_input(model, info.name, buffer.data(), buffer.size()) != QC_OK)
      throw Error(api.last_error());
  }
  if (api.run(model) != QC_OK) throw Error(api.last_error());  // also the warm-up
  std::vector<double> times(repeat);
  if (api.benchmark(model, repeat, times.data()) != QC_OK) throw Error(api.last_error());
  std::vector<std::pair<std::string, std::string>> files;
  for (size_t i = 0; i < outs.size(); ++i) {
    std::vector<char> buffer(outs[i].bytes);
    if (api.get_output(model, static_cast<int>(i), buffer.data(), buffer.size()) != QC_OK)
      throw Error(api.last_error());
    std::vector<int64_t> shape(outs[i].shape, outs[i].shape + outs[i].ndim);
    files.emplace_back(outs[i].name, Npy(outs[i].dtype, shape, buffer.data(), buffer.size()));
  }
  std::vector<double> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  double mean = 0;
  for (double t : times) mean += t / times.size();
  double median = sorted.size() % 2 ? sorted[sorted.size() / 2]
                                    : (sorted[sorted.size() / 2 - 1] + sorted[sorted.size() / 2]) / 2;
  double rank = 0.9 * (sorted.size() - 1);
  size_t low = static_cast<size_t>(rank);
  double p90 = sorted[low] + (rank - low) * (sorted[std::min(low + 1, sorted.size() - 1)] - sorted[low]);
  std::printf("latency on this machine: mean %.3f ms, median %.3f ms, p90 %.3f ms (%d runs)\n",
              mean, median, p90, repeat);
  std::printf("peak resident memory: %.1f MB\n", PeakRssMb());
  if (!output_path.empty()) {
    WriteNpz(output_path, files);
    std::printf("outputs saved to %s\n", output_path.c_str());
  }
  api.free(model);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qcompile-run: error: %s\n", e.what());
    return 2;
  }
}
