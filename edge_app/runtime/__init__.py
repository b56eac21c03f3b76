"""The running line (``musc-edge run``): inspector, threads, pools on disk, control socket, calibration."""
