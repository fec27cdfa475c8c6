/* A C program that embeds a qcompile model: load it, fill its inputs, run it, print the first
 * values of its first output. Build it against a bundle (see qcompile.h):
 *
 *   cc -I BUNDLE/include example.c -o example -L BUNDLE/lib -lqcompile -Wl,-rpath,BUNDLE/lib
 *   ./example BUNDLE
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcompile.h"

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s BUNDLE\n", argv[0]);
    return 2;
  }
  qc_model *model = NULL;
  if (qc_load(argv[1], 0, &model) != QC_OK) {
    fprintf(stderr, "example: %s\n", qc_last_error());
    return 2;
  }
  for (int i = 0; i < qc_num_inputs(model); ++i) {
    qc_tensor_info info;
    qc_input_info(model, i, &info);
    unsigned char *data = calloc(1, info.bytes); /* zeros: a real app passes its data */
    if (qc_set_input(model, info.name, data, info.bytes) != QC_OK) {
      fprintf(stderr, "example: %s\n", qc_last_error());
      return 2;
    }
    free(data);
  }
  if (qc_run(model) != QC_OK) {
    fprintf(stderr, "example: %s\n", qc_last_error());
    return 2;
  }
  qc_tensor_info out;
  qc_output_info(model, 0, &out);
  float *values = malloc(out.bytes);
  qc_get_output(model, 0, values, out.bytes);
  printf("%s:", out.name);
  if (strcmp(out.dtype, "float32") == 0)
    for (size_t i = 0; i < out.bytes / sizeof(float) && i < 4; ++i) printf(" %g", values[i]);
  printf("\n");
  free(values);
  qc_free(model);
  return 0;
}
