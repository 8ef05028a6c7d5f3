#!/usr/bin/env python3
"""Writes tests/vectors/envelopes.txt: envelopes of both formats, made by an implementation that
is not ours (pyca/cryptography's HKDF and AES-GCM), which the crypto core must open.

    python3 scripts/envelope-vectors.py > tests/vectors/envelopes.txt

Format version 2: header = 02 || key id (big-endian u32); nonce = 24 bytes;
value key = HKDF-SHA256(salt="pg_cellcrypt v2", ikm=data key,
                        info="pg_cellcrypt value key" || nonce[:12], 32 bytes);
ciphertext || tag = AES-256-GCM(value key, nonce[12:], plaintext, aad = header || context).
Format version 1: header = 01 || key id; nonce = 12 bytes;
ciphertext || tag = AES-256-GCM(data key, nonce, plaintext, aad = header || context).
"""
import hashlib
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def det(label, n):
    """Deterministic bytes, so that the file is reproducible."""
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{i}".encode()).digest()
        i += 1
    return out[:n]


def v2(key, key_id, binding, nonce, context, plaintext):
    header = bytes([2]) + struct.pack(">I", (binding << 16) | key_id)
    vk = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"pg_cellcrypt v2",
              info=b"pg_cellcrypt value key" + nonce[:12]).derive(key)
    return header + nonce + AESGCM(vk).encrypt(nonce[12:], plaintext, header + context)


def v1(key, key_id, binding, nonce, context, plaintext):
    header = bytes([1]) + struct.pack(">I", (binding << 16) | key_id)
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header + context)


CASES = [
    # (format, key id, binding, context, plaintext)
    (2, 1, 0, b"text", b"hello"),
    (2, 1, 0, b"text", b""),
    (2, 7, 3, b"text", b"alice@example.com"),
    (2, 65535, 65535, b"bytea", bytes(range(256))),
    (2, 2, 0, b"jsonb", '{"salary": 81000, "note": "\u00e9t\u00e9"}'.encode()),
    (2, 3, 0, b"pg_cellcrypt keywrap;2", det("wrapped", 32)),
    (1, 1, 0, b"text", b"hello"),
    (1, 9, 2, b"text", b"written before 0.2.0"),
    (1, 4, 0, b"int8", struct.pack(">q", -42)),
]

print("# pg_cellcrypt envelopes made by pyca/cryptography (scripts/envelope-vectors.py).")
print("# Each must open to Plaintext under Key with Context, and fail with any byte changed.")
for i, (fmt, key_id, binding, context, pt) in enumerate(CASES):
    key = det(f"key{i}", 32)
    if fmt == 2:
        env = v2(key, key_id, binding, det(f"nonce{i}", 24), context, pt)
    else:
        env = v1(key, key_id, binding, det(f"nonce{i}", 12), context, pt)
    print()
    print(f"Count = {i}")
    print(f"Format = {fmt}")
    print(f"Key = {key.hex()}")
    print(f"KeyId = {key_id}")
    print(f"Binding = {binding}")
    print(f"Context = {context.hex()}")
    print(f"Plaintext = {pt.hex()}")
    print(f"Envelope = {env.hex()}")
