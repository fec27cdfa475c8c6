"""qcompile's own schedule rules and tensor intrinsics (ARM CPU int8, mobile GPU).

Installed as `qcompile.schedules`: intrinsics (the i8mm `smmla` intrinsic, the re-registered
VNNI one), packed_int8 (the int8 layouts they tensorize), int8_default and float_default
(default CPU schedules for kernels without a tuning record), loop_tiles (their shared steps),
gpu_default (which dlight rules schedule OpenCL kernels), cpu_search and gpu_search (the
spaces MetaSchedule tunes CPU and OpenCL kernels in).
"""
