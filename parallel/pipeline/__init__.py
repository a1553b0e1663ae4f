"""plait.parallel.pipeline: schedules as data, their validator, simulator, plot and runtime."""
