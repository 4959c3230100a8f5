"""``meddiffseg send``: C-STORE DICOM files (e.g. a SEG and a Parametric Map) to a PACS."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Send DICOM files to a PACS (or any DICOM storage SCP) with C-STORE and report, per
instance, the status the PACS answered. Nothing counts as sent without a success status.
"""

EPILOG = """\
exit codes:
  0    every instance was stored (success, or success with a warning status)
  1    invalid option (e.g. an AE title longer than 16 characters)
  2    a file is missing or not DICOM (nothing is sent)
  6    the PACS cannot be reached, refused or timed out the association (nothing sent),
       or did not store every instance (the failed ones are listed)

example:
  meddiffseg send out/segmentation.dcm out/uncertainty_pmap.dcm --host pacs.example.org \\
      --port 104 --aet PACS
"""


# Same as MedDiffSegLib.dicom.send's defaults (not imported here: --help stays fast).
DEFAULT_CALLING_AET = "MEDDIFFSEG"
DEFAULT_TIMEOUT_S = 30.0


def add_parser(sub) -> None:
    p = sub.add_parser("send", help="C-STORE DICOM files to a PACS", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM files to send")
    p.add_argument("--host", required=True, help="PACS host name or address")
    p.add_argument("--port", required=True, type=int, help="PACS DICOM port")
    p.add_argument("--aet", required=True, metavar="AET", help="the PACS's AE title (called AE title)")
    p.add_argument("--calling-aet", default=DEFAULT_CALLING_AET, metavar="AET",
                   help=f"our AE title (default: {DEFAULT_CALLING_AET})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for the connection, the association and each store (default: {DEFAULT_TIMEOUT_S:g})")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..dicom.send import PacsError, send_files

    results = send_files(args.files, args.host, args.port, args.aet, calling_aet=args.calling_aet, timeout=args.timeout)
    width = max(len(r.path) for r in results)
    for r in results:
        code = "----" if r.status is None else f"0x{r.status:04X}"
        print(f"{'stored' if r.stored else 'FAILED':6}  {r.path:{width}}  {code}  {r.sop_class_name}  "
              f"{r.sop_instance_uid}  {r.message}")
    failed = [r for r in results if not r.stored]
    where = f"{args.aet}@{args.host}:{args.port}"
    if failed:
        raise PacsError(f"{len(failed)} of {len(results)} instance(s) were not stored by {where}")
    print(f"{len(results)} instance(s) stored by {where}")
    return 0
