"""Deployment through Flower (design.md §1.2): the same strategies on real SuperNodes.

- `server_app`: a ServerApp that runs `Simulation` with a `FlowerExecutor`;
- `client_app`: a ClientApp that runs `device.train.run_job` for the device its node plays;
- `messages`: the typed records that cross the wire;
- `executor`: jobs -> messages -> `JobOutput`, node discovery, traffic and participation logs;
- `run_config`: what the ServerApp and its launcher share (run config keys, run-directory files);
- `deploy`: start a SuperLink and N SuperNodes on this machine (TLS, SuperNode auth) and run on them;
- `command`: `hierfedlora flower`, which runs one experiment on such a federation.

See docs/flower.md.
"""
