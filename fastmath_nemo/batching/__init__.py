"""How rows reach a policy: the ``Batch`` type, its micro-batches, the step's totals, and the
document layout of packed rows. Below the policies and the algorithms, which both use it."""
