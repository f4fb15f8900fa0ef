"""Who a registered model belongs to: a model registered by a submission carries its submitter in the
tag `compress.owner`, and only that submitter's submissions add versions to it (docs/security.md).
MLflow names cannot hold '/', so names are not prefixed by the submitter."""

from __future__ import annotations

from typing import Any

from compress.errors import CompressError

OWNER_TAG = "compress.owner"  # on a registered model: the submitter whose submissions may add versions


def check_owner(mlflow_client: Any, name: str, owner: str) -> None:
    """CompressError (one line) unless the registered model `name` is new or `owner`'s. `name` is
    one confine.registered_name accepted (no quotes)."""
    found = mlflow_client.search_registered_models(filter_string=f"name = '{name}'")
    if not found:
        return
    holder = found[0].tags.get(OWNER_TAG)
    if holder != owner:
        whose = f"submitter {holder!r}" if holder else "no submitter (it was registered outside the service)"
        raise CompressError(f"output.register_as: the registered model {name!r} belongs to {whose}; "
                            f"choose another name, e.g. --set output.register_as={owner}-{name}")
