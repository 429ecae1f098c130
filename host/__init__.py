"""How pvlun touches the host: the one command runner, sandboxes, loop devices, mounts."""
