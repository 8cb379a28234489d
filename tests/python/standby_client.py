"""A stock Python grpcio client for the Standby coordinator.

The code generated from proto/ (python -m grpc_tools.protoc) must be importable: run with
PYTHONPATH=<the protoc output directory>. The channel is ordinary TLS with a client certificate
(grpc.ssl_channel_credentials) and ordinary host name verification: the coordinator's server
certificate names localhost, 127.0.0.1, ::1, its host name and every `coordinator init --san`.

Used by tests/python_client.rs: `python standby_client.py PLAN.json` runs each probe of the plan
and prints one JSON line per probe: {"name", "code", "value"}. The README's example is the same
calls, trimmed.
"""

import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from standby.v1 import coordinator_pb2, coordinator_pb2_grpc


def channel(target, ca_pem, cert_dir, name_override=None):
    """A mutual-TLS channel to the coordinator at target (host:port) with the certificate in
    cert_dir (node.pem, node.key, as `coordinator init` and `coordinator cert` write them)."""
    with open(ca_pem, "rb") as f:
        root = f.read()
    with open(f"{cert_dir}/node.key", "rb") as f:
        key = f.read()
    with open(f"{cert_dir}/node.pem", "rb") as f:
        chain = f.read()
    creds = grpc.ssl_channel_credentials(root, key, chain)
    # Only to show that names are checked: a test asks for a name the certificate lacks.
    options = [("grpc.ssl_target_name_override", name_override)] if name_override else []
    return grpc.secure_channel(target, creds, options=options)


def health(ch):
    reply = health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service="standby.v1.Coordinator"), timeout=10
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def list_pairs(ch):
    reply = coordinator_pb2_grpc.AdminStub(ch).ListPairs(
        coordinator_pb2.ListPairsRequest(), timeout=10
    )
    return [p.pair for p in reply.pairs]


def create_pair(ch, pair):
    reply = coordinator_pb2_grpc.AdminStub(ch).CreatePair(
        coordinator_pb2.PairRequest(pair=pair), timeout=10
    )
    return reply.pair


CALLS = {
    "health": lambda ch, probe: health(ch),
    "list_pairs": lambda ch, probe: list_pairs(ch),
    "create_pair": lambda ch, probe: create_pair(ch, probe["pair"]),
}


def run(probe):
    """One call; its status code's name and its value (None unless OK)."""
    with channel(probe["target"], probe["ca"], probe["cert_dir"], probe.get("name_override")) as ch:
        try:
            return "OK", CALLS[probe["call"]](ch, probe)
        except grpc.RpcError as e:
            return e.code().name, e.details()


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    for probe in plan:
        code, value = run(probe)
        print(json.dumps({"name": probe["name"], "code": code, "value": value}), flush=True)


if __name__ == "__main__":
    main()
