"""`zq keys generate`: CurveZMQ key pairs for a secured cluster (see zq.io.security, docs/lan.md).

    zq keys generate --out keys                       # keys/cluster.key, keys/cluster.key_secret
    zq keys generate --out keys/clients --name app1   # a client's pair; copy app1.key to the nodes

Errors (an existing file, an unwritable folder) are zq errors, so the app's entry point prints
them as one sentence with exit code 2 or 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

NEXT_STEPS_CLUSTER = ("copy both files to every node and name them in the topology's [security] table "
                      "(cluster_secret_key_file, cluster_public_key_file); give clients {public} only")
NEXT_STEPS_CLIENT = ("copy {public} into every node's allowed_clients_dir; the client uses "
                     "ZQ_CLIENT_KEY={secret} and ZQ_CLUSTER_KEY=<the cluster's .key file>")


def generate(
    out: Annotated[Path, typer.Option("--out", help="Folder to write NAME.key and NAME.key_secret into.")] = Path("keys"),
    name: Annotated[str, typer.Option("--name", help="Key pair name: 'cluster' for the cluster's pair, "
                                                     "anything else for a client.")] = "cluster",
    force: Annotated[bool, typer.Option("--force", help="Replace existing files of that name.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")] = False,
) -> None:
    """Write a new key pair: NAME.key (public, give it out) and NAME.key_secret (mode 0600, keep it)."""
    from zq.io.security import generate_keys, load_public_key
    public_path, secret_path = generate_keys(out, name, overwrite=force)
    public = load_public_key(public_path).decode()
    steps = (NEXT_STEPS_CLUSTER if name == "cluster" else NEXT_STEPS_CLIENT).format(public=public_path,
                                                                                   secret=secret_path)
    if json_out:
        doc = {"name": name, "public_key": public, "public_key_file": str(public_path),
               "secret_key_file": str(secret_path)}
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    sys.stdout.write(f"public key  {public}\nwrote       {public_path}\n            {secret_path} (secret: keep it "
                     f"private)\nnext        {steps}\n")
