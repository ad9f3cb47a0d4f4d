"""TPM 2.0 attestation tests (no Django; run with -p no:django)."""
