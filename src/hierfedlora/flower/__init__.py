"""Deployment through Flower (design.md §1.2): the same strategies on real SuperNodes.

- `server_app`: a ServerApp that runs `Simulation` with a `FlowerExecutor`;
- `client_app`: a ClientApp that runs `trainer.run_job` for the device its node plays;
- `messages`: the typed records that cross the wire;
- `executor`: jobs -> messages -> `JobOutput`, node discovery, traffic and participation logs;
- `deploy`: start a SuperLink and N SuperNodes on this machine (TLS, SuperNode auth) and run on them.

See docs/flower.md.
"""
