"""The plain device runtime: a PEFT model that takes a device's plan, trains its steps and is
evaluated (`model`, `train`), and the executor that runs jobs with it in this process
(`executor`). It reads on its own and never imports `hierfedlora.fast`, which wraps it for speed."""
