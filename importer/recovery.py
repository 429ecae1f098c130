"""Start-up repair of imports (pvlun/controllers.py runs it after the attachments are undone):
imports, uploads and clones cut off mid-way lose their half-written claim and start again
from scratch on a fresh volume, with restartCount + 1 (CDI restarts its importer or upload
pod the same way); scratch copies and nbdkit directories they left are removed."""

from __future__ import annotations

from controlplane.context import Context
from controlplane.recovery import Counts, guarded
from importer.reconcile import key_of, start_over
from importer.scratch import clean_scratch

UNFINISHED_DV_PHASES = ("ImportScheduled", "ImportInProgress", "CloneScheduled", "CloneInProgress")


def recover_imports(ctx: Context, counts: Counts, attachment_owners: list[str]) -> None:
    """attachment_owners: who held a volume before the restart (an upload's volume was attached
    while the upload was under way)."""
    counts["scratch"] = clean_scratch(ctx.data_dir)
    counts.setdefault("datavolumes", 0)
    uploading = {owner.removeprefix("upload/") for owner in attachment_owners if owner.startswith("upload/")}
    for dv in ctx.store.list("DataVolume"):
        guarded(ctx, counts, dv, lambda: _recover_datavolume(ctx, dv, uploading, counts))


def _recover_datavolume(ctx: Context, dv: dict, uploading: set[str], counts: Counts) -> None:
    phase = (dv.get("status") or {}).get("phase")
    if phase in UNFINISHED_DV_PHASES:
        start_over(ctx.store, dv, "ImportRestarted", "pvlun serve restarted during the import; starting over")
    elif phase in ("UploadScheduled", "UploadReady") and key_of(dv) in uploading:
        start_over(ctx.store, dv, "UploadRestarted",
                   "pvlun serve restarted during the upload; send the image again (it goes to a fresh volume)")
    else:
        return
    counts["datavolumes"] += 1
