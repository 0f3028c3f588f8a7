"""Test setup: 8 virtual CPU devices (set before jax is imported) and float32 matmul precision."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's caches (and with them the compiled programs) after each test module.

    Every compiled XLA:CPU program keeps its JIT code in its own memory mappings (hundreds for an engine step),
    so one process running the whole suite otherwise accumulates tens of thousands of mappings; near the
    kernel's ``vm.max_map_count`` (65530 by default) LLVM can no longer map new code and the process crashes
    while compiling. Programs are rarely shared between modules, so little is recompiled.
    """
    yield
    jax.clear_caches()
    if os.environ.get("MOEJAX_TEST_MAPS"):  # diagnostics: memory mappings left after the module
        with open("/proc/self/maps") as f:
            print(f"\n[maps after module: {sum(1 for _ in f)}]")
