"""The pipeline's stages: each a function of paths and params that reads the previous stages' files and writes
its own (`tokenbridge.flows` wires them into Prefect flows). No stage imports another."""
