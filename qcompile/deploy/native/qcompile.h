/* qcompile.h: run a model compiled by qcompile from C or C++, without Python.
 *
 * A bundle (`qcompile package OUT_DIR -o BUNDLE`) holds the model (model.so, model.json), the
 * TVM runtime libraries for the device (lib/), this library (lib/libqcompile.so) and a runner
 * (bin/qcompile-run). Link your program with -Llib -lqcompile (and an rpath to lib/):
 *
 *     qc_model *model;
 *     if (qc_load("bundle", 0, &model) != QC_OK) { fprintf(stderr, "%s\n", qc_last_error()); }
 *     qc_set_input(model, "images", pixels, sizeof pixels);
 *     qc_run(model);
 *     qc_get_output(model, 0, logits, sizeof logits);
 *     qc_free(model);
 *
 * Every call returns QC_OK or an error code, with a message naming the problem and the fix in
 * qc_last_error() (per thread); nothing aborts. A model is used by one thread at a time.
 */
#ifndef QCOMPILE_H_
#define QCOMPILE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  QC_OK = 0,
  QC_ERR_ARGUMENT = 1,   /* a null pointer, an index out of range, a bad thread count */
  QC_ERR_BUNDLE = 2,     /* the bundle directory, its manifest or its library is missing or unreadable */
  QC_ERR_INTEGRITY = 3,  /* model.so does not match the sha256 its manifest records */
  QC_ERR_DEVICE = 4,     /* built for another architecture, or for instructions this CPU lacks */
  QC_ERR_RUNTIME = 5,    /* the TVM runtime library is missing, or failed loading or running */
  QC_ERR_INPUT = 6       /* an input of another name, size or type than the manifest's */
} qc_status;

#define QC_MAX_DIMS 8

typedef struct {
  const char *name;   /* owned by the model */
  const char *dtype;  /* "float32", "int64", "uint8", ... */
  int ndim;
  int64_t shape[QC_MAX_DIMS];
  size_t bytes;       /* the tensor's size in bytes */
} qc_tensor_info;

typedef struct qc_model qc_model;

/* Load the bundle (or compile output) directory `dir`: check model.so against the manifest's
 * sha256, this CPU against the target, then load the TVM runtime and the model.
 * num_threads: the threads the model's kernels use (0: the runtime's default). The thread
 * count is per process: the first model loaded sets it. */
qc_status qc_load(const char *dir, int num_threads, qc_model **out);

int qc_num_inputs(const qc_model *model);
int qc_num_outputs(const qc_model *model);
qc_status qc_input_info(const qc_model *model, int index, qc_tensor_info *info);
qc_status qc_output_info(const qc_model *model, int index, qc_tensor_info *info);

/* Set the input `name` from `bytes` bytes at `data` (C order, the manifest's dtype). The data
 * is read when the call returns (the runtime copies it). */
qc_status qc_set_input(qc_model *model, const char *name, const void *data, size_t bytes);

/* Run the model on the inputs set (every input must have been set once). */
qc_status qc_run(qc_model *model);

/* Copy output `index` of the last run into `data` (`bytes`: its size, qc_output_info). */
qc_status qc_get_output(qc_model *model, int index, void *data, size_t bytes);

/* Run `runs` times on the inputs set; times_ms[i]: the i-th run's wall time in ms. */
qc_status qc_benchmark(qc_model *model, int runs, double *times_ms);

/* The message of this thread's last error (empty after a success). */
const char *qc_last_error(void);

void qc_free(qc_model *model);

#ifdef __cplusplus
}
#endif

#endif /* QCOMPILE_H_ */
