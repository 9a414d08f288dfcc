"""Raw-disk seizure examination: the harness every seizure check uses (docs/threat-model.md §8).

Pieces, each usable alone:

- ``disk.LoopImage``: a sparse ext4 image, loop-mounted without ``discard``; ``plant_canary()``
  puts a random marker in free space; ``snapshot()`` freezes the filesystem, copies the raw
  image and thaws it. ``disk.unallocated()`` (``blkls``) and ``disk.files_named()``
  (``fls``/``icat``) read a copy the way an examiner does. Needs root, e2fsprogs, sleuthkit.
- ``carve.carve()``: SQLite b-tree leaf records found anywhere in a buffer (database pages,
  WAL frames), decoded with their varints; ``sqlcipher.sqlcipher_pages()`` decrypts SQLCipher 4
  page candidates for it when the examiner has the key.
- ``examine``: key finders (``node_epoch_keys`` over ``parse_epoch_keys``;
  ``device_storage_keys``: ``device.keys`` header and message slots, version-1 ``device.key``),
  the envelope ``Ledger`` (ground truth) and the figures per node or device image
  (``node_figures``, ``device_figures``). Key finders, record openers (``sealed_rows``: schema
  v3 rows opened with ``node/atrest.py``'s own code; ``sealed_columns`` for older formats) and
  page decryptors are parameters, so a change of the at-rest format changes one function, not
  the test.
- ``workload``: a client-side tap that fills the ledger, nodes with the test-only clock switch.

A new feature's seizure check: put its homes on ``LoopImage``s, run its workload under
``workload.tap``, and for each copy assert on ``node_figures``/``device_figures`` (or on
``carve`` and ``Scan.found`` for data of its own), always with a canary that must be found.
"""
