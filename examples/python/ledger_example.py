#!/usr/bin/env python3
"""Quire's gRPC ledger API from Python: create a ledger, append entries, close it, read them back.

Usage:
    python3 examples/python/ledger_example.py 127.0.0.1:4181 [--stubs DIR]

Needs `pip install grpcio grpcio-tools`. The stubs are generated from the project's .proto files:

    python3 -m grpc_tools.protoc -I proto/proto --python_out=DIR --grpc_python_out=DIR \\
        proto/proto/quire/ledger/v1/ledger.proto

Without --stubs the script runs that itself into a temporary directory.
"""

import argparse
import os
import sys
import tempfile


def generate_stubs(out_dir):
    from grpc_tools import protoc

    proto_root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "proto")
    proto_root = os.path.normpath(proto_root)
    # grpc_tools ships the well-known types; protoc needs their directory on the include path.
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            "-I" + proto_root,
            "-I" + well_known,
            "--python_out=" + out_dir,
            "--grpc_python_out=" + out_dir,
            os.path.join(proto_root, "quire", "ledger", "v1", "ledger.proto"),
        ]
    )
    if rc != 0:
        sys.exit("protoc failed with exit code %d" % rc)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("addr", help="ledger API address, e.g. 127.0.0.1:4181")
    parser.add_argument("--stubs", help="directory holding the generated quire/ledger/v1 stubs")
    args = parser.parse_args()

    stubs = args.stubs
    if stubs is None:
        stubs = tempfile.mkdtemp(prefix="quire-stubs-")
        generate_stubs(stubs)
    sys.path.insert(0, stubs)

    import grpc
    from quire.ledger.v1 import ledger_pb2 as pb
    from quire.ledger.v1 import ledger_pb2_grpc as rpc

    password = b"secret"
    with grpc.insecure_channel(args.addr) as channel:
        api = rpc.LedgerServiceStub(channel)

        # Create: E=3, Qw=3, Qa=2 (a standalone instance has three bookies).
        created = api.Create(
            pb.CreateRequest(
                ensemble_size=3,
                write_quorum=3,
                ack_quorum=2,
                password=password,
                custom={"app": "python-example"},
            ),
            timeout=30,
        )
        ledger_id = created.ledger_id
        print("created ledger", ledger_id)

        # Append: one bidi stream; the first request names the ledger; ids come back in order.
        messages = [b"hello", b"from", b"python"]

        def requests():
            yield pb.AppendRequest(ledger_id=ledger_id, password=password, payloads=messages[:1])
            yield pb.AppendRequest(payloads=messages[1:])

        acked = []
        for resp in api.Append(requests(), timeout=30):
            acked.extend(resp.entry_ids)
        print("appended entries", acked)

        closed = api.Close(pb.CloseRequest(ledger_id=ledger_id, password=password), timeout=30)
        print(
            "closed: last entry %d, %d bytes, state %s"
            % (closed.info.last_entry_id, closed.info.length, pb.LedgerState.Name(closed.info.state))
        )

        # Read everything back (last_entry=-1: up to the last entry).
        read = api.Read(
            pb.ReadRequest(ledger_id=ledger_id, password=password, first_entry=0, last_entry=-1),
            timeout=30,
        )
        entries = [e for resp in read for e in resp.entries]
        for e in entries:
            print("entry %d: %s" % (e.entry_id, e.payload.decode()))
        if [e.payload for e in entries] != messages:
            sys.exit("read back %r, expected %r" % ([e.payload for e in entries], messages))

        # Errors carry a stable code in the x-quire-ledger-code trailer.
        try:
            api.Info(pb.InfoRequest(ledger_id=ledger_id + 1_000_000), timeout=30)
        except grpc.RpcError as err:
            code = dict(err.trailing_metadata() or ()).get("x-quire-ledger-code")
            print("info of a missing ledger: %s (%s)" % (err.code().name, code))
    print("ok")


if __name__ == "__main__":
    main()
