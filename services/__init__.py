"""Service plugins: one ServiceProgramTemplate subclass per service name."""
