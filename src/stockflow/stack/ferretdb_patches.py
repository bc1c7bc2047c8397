"""The patches stockflow's FerretDB build carries, applied to a copy of the module's source.

Three small patches (:data:`PATCHES`, wired in with a ``replace`` directive by ``ferretdb.py``),
none of which changes a result:

- FerretDB v1 pushes a filter on ``_id`` down to PostgreSQL as JSON containment
  (``_jsonb->'_id' @> $1``), which the btree index FerretDB itself creates on ``_id`` cannot
  serve: every lookup or update by ``_id`` scanned the whole table (6 ms per statement at
  20,000 documents, growing with the collection). ``_id`` is never an array, so containment is
  plain equality there; the patch says ``=`` for ``_id`` and the index is used (0.7 ms, flat).
  FerretDB filters every fetched document again anyway.
- An update that changes one document runs its one ``UPDATE`` statement on its own instead of
  between ``BEGIN`` and ``COMMIT`` (one statement is atomic): two round trips fewer per
  document, a quarter of FerretDB's CPU for an update.
- Leak tracking of cursors and iterators (a stack trace recorded for each, a panic of the whole
  server for one not closed) is off: it took a tenth of the server's CPU under load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stockflow.errors import ProvisionError

BUILD_TAG = "stockflow2"
"""Names the patch level in the cache folder, so a changed patch means a fresh build."""


@dataclass(frozen=True)
class Patch:
    """Replace ``anchor`` (which must occur exactly once) in ``path`` of the module source."""

    path: str
    anchor: str
    replacement: str


_FILTER_EQUAL_END = """\
	default:
		panic(fmt.Sprintf("Unexpected type of value: %v", v))
	}

	return
}
"""

_UPDATE_ALL_LOOP = """\
	err = pool.InTransaction(ctx, p, func(tx pgx.Tx) error {
		for _, doc := range params.Docs {
			var b []byte
			if b, err = sjson.Marshal(doc); err != nil {
				return lazyerrors.Error(err)
			}
"""

_UPDATE_ONE = """\
	// stockflow: one UPDATE statement is atomic on its own; BEGIN and COMMIT around it cost
	// two more round trips to PostgreSQL for every document an update command changes.
	if len(params.Docs) == 1 {
		doc := params.Docs[0]

		b, err := sjson.Marshal(doc)
		if err != nil {
			return nil, lazyerrors.Error(err)
		}

		id, _ := doc.Get("_id")
		must.NotBeZero(id)

		tag, err := p.Exec(ctx, q, b, must.NotFail(sjson.MarshalSingleValue(id)))
		if err != nil {
			return nil, lazyerrors.Error(err)
		}

		res.Updated = int32(tag.RowsAffected())

		return &res, nil
	}

"""

_TRACK_START = """\
func Track(obj any, token *Token) {
	checkArgs(obj, token)
"""

_UNTRACK_START = """\
func Untrack(obj any, token *Token) {
	checkArgs(obj, token)
"""

_RETURN = """\

	// stockflow: leak tracking records a stack trace for every cursor and iterator (a tenth
	// of the server's CPU under load) and panics the whole server if one is not closed.
	return
"""

PATCHES = (
    Patch(
        "internal/backends/postgresql/query.go",
        _FILTER_EQUAL_END,
        _FILTER_EQUAL_END.removesuffix("\n\treturn\n}\n")
        + """
	// stockflow: _id is never an array, so containment is equality, which the _id index serves.
	if k == "_id" && operator == "->" && filter != "" {
		filter = strings.Replace(filter, " @> ", " = ", 1)
	}

	return
}
""",
    ),
    Patch(
        "internal/backends/postgresql/collection.go",
        _UPDATE_ALL_LOOP,
        _UPDATE_ONE + _UPDATE_ALL_LOOP,
    ),
    Patch("internal/util/resource/resource.go", _TRACK_START, _TRACK_START + _RETURN),
    Patch("internal/util/resource/resource.go", _UNTRACK_START, _UNTRACK_START + _RETURN),
)


def apply_patches(source: Path) -> None:
    """Apply :data:`PATCHES` to a writable copy of the FerretDB module source."""
    for patch in PATCHES:
        target = source / patch.path
        text = target.read_text()
        if text.count(patch.anchor) != 1:
            raise ProvisionError(
                f"ferretdb: cannot patch {patch.path}: the expected code is not there "
                "(a different FerretDB version?)"
            )
        target.write_text(text.replace(patch.anchor, patch.replacement))
