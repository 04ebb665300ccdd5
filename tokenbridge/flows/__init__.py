"""Prefect flows: one per stage, plus the whole pipeline and the loss comparison. They only wire
`tokenbridge.stages` together; `tokenbridge <flow>` (tokenbridge/cli.py) runs one."""
