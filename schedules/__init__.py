"""qcompile's own schedule rules and tensor intrinsics (ARM CPU int8, mobile GPU).

Installed as `qcompile.schedules`. Empty until the int8 and tuning work lands: TVM's default
schedules (and dlight for OpenCL targets) are used meanwhile.
"""
