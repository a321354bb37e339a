"""``verify_shards``: read every block of every shard through the verifying stream.

Unlike training, which stops at the first damaged block, this reads on and reports every
damaged shard (the first few messages and a count, so a million bad shards still give a
short report). Cost: one sequential read of the dataset.
"""

from __future__ import annotations

from typing import Any, Dict, List

from .format import ShardError, load_manifest, resolve_manifest_url, short_list
from .stream import read_shard


def verify_shards(url: str, raise_on_error: bool = True, max_messages: int = 5) -> Dict[str, Any]:
    """Verify all shards of the manifest at ``url``; returns ``{"shards", "blocks", "records",
    "problems": [first messages], "bad_shards": count}``. Raises :class:`ShardError` listing the
    first problems when there are any and ``raise_on_error``."""
    m = load_manifest(url)
    _, base = resolve_manifest_url(url)
    problems: List[str] = []
    bad = blocks = records = 0
    for s, sh in enumerate(m["shards"]):
        try:
            for _, blk in read_shard(m, base, s, set(range(len(sh["blocks"])))):
                blocks += 1
                records += int(blk.records.size)
        except ShardError as e:
            bad += 1
            if len(problems) < max_messages:
                problems.append(str(e))
    if bad and raise_on_error:
        more = f" (and {bad - len(problems)} more)" if bad > len(problems) else ""
        raise ShardError(f"{bad} of {len(m['shards'])} shard(s) failed verification: "
                         + short_list(problems, max_messages) + more)
    return {"shards": len(m["shards"]), "blocks": blocks, "records": records, "problems": problems,
            "bad_shards": bad}
