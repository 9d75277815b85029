#!/usr/bin/env python3
"""Writes fuzz/seeds/<target>/ from the committed test vectors, so each
fuzzer starts from valid inputs. Run from the repository root."""
import json, os, struct

v = json.load(open("testvectors/vectors.json"))
relay = json.load(open("testvectors/relay.json"))
sealed = json.load(open("testvectors/sealed.json"))
pair = json.load(open("testvectors/pair.json"))
seeds = {
    "card": [bytes.fromhex(c["bytes"]) for c in v["cards"]] + [c["text"].encode() for c in v["cards"]],
    "sealed_message": [bytes.fromhex(c["sealed"]) for c in sealed],
    "message_plaintext": [bytes.fromhex(v["message_plaintext"]["plaintext"])],
    "manifest": [bytes.fromhex(v["blob"]["manifest"])],
    "blob": [struct.pack(">Q", len(bytes.fromhex(v["blob"]["plaintext"]))) + bytes([0]) + bytes.fromhex(v["blob"]["blob"])],
    "secret_key_file": [i["secret_file"].encode() for i in v["identities"]],
    "report": [bytes.fromhex(r["bytes"]) for r in v["reports"]] + [r["text"].encode() for r in v["reports"]],
    "repair": [bytes.fromhex(v["repair"]["request"]), bytes.fromhex(v["repair"]["offer"])],
    "relay_frame": [bytes.fromhex(f["frame"]) for f in relay["requests"] + relay["responses"]]
    + [b"".join(bytes.fromhex(f["frame"]) for f in relay["requests"])],
    "pair": [b"\x00" + pair["code"].encode(), b"\x00sealpost-invite:" + pair["code"].encode() + b"@127.0.0.1:7443/AAAA",
             b"\x01" + bytes.fromhex(pair["Y"]) + bytes.fromhex(pair["sealed_b"]),
             b"\x03" + bytes.fromhex(pair["X"]) + bytes.fromhex(pair["sealed_a"])],
    "notice": [bytes.fromhex(relay["notices"][k]) for k in ("refused", "gave_up", "blob_refused", "blob_gave_up")],
}
for target, items in seeds.items():
    d = os.path.join("fuzz", "seeds", target)
    os.makedirs(d, exist_ok=True)
    for n, data in enumerate(items):
        open(os.path.join(d, f"vector-{n}"), "wb").write(data)
