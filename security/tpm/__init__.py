"""TPM 2.0 attestation core (pure Python: stdlib + cryptography, no Django).

Owns: TPM structure parsing (:mod:`.structures`), server-side MakeCredential
(:mod:`.credential`) and the quote / EK-certificate / policy verifier
(:mod:`.verify`). The Django app wraps these; nothing here touches a database,
settings or the network.
"""
