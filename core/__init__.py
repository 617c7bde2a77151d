"""jetflow's pure domain (``jetflow.core``): events, codec, state machines, subjects,
submission validation, retry policy, scheduling and the fleet model. No module here does
I/O or imports anything of jetflow outside this package (tests/test_purity.py checks)."""
