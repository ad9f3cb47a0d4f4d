"""Identity and trust: device keys, enrollment, TPM attestation, operator roles, the audit log."""
