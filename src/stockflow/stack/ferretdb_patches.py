"""The patches stockflow's FerretDB build carries, applied to a copy of the module's source.

Three small patches speed FerretDB up without changing any result (:data:`SPEED_PATCHES`):

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

One patch fixes a deadlock (:data:`POOL_PATCHES`, reasoning at its definition): a write
command no longer holds one pooled PostgreSQL connection while it waits for another, so
concurrent multi-statement updates cannot exhaust the pool and wait on each other for ever.

One patch changes a result, to MongoDB's (:data:`CAS_PATCHES`, reasoning at its definition):
an update whose document was changed by another writer between FerretDB's read and its write
no longer overwrites that change; the document is read again and updated only if it still
matches the filter, so a compare-and-set fences a stale writer and ``$inc`` loses nothing.

:data:`BUILD` is what the local stack runs; :data:`WITHOUT_CAS` is the same build without the
compare-and-set patch, kept for the side-by-side benchmark; :data:`WITHOUT_POOL_FIX` is the
build before the deadlock fix, which the deadlock test runs when it is in the cache. Each
names its cache folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stockflow.errors import ProvisionError


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

# stockflow: a write command holds at most one pooled connection at a time.
#
# FerretDB's PostgreSQL backend reads a query's rows from a pooled connection (pgx), which
# goes back to the pool only when the rows have been read to the end or closed. Its `update`
# handler (handler/msg_update.go, updateDocument) runs each statement of the command as a
# query, then common.UpdateDocument writes each matching document with UpdateAll, which takes
# another pooled connection, while the query is still open: a statement with `multi: false`
# reads one row through LimitIterator(1) and never reaches the end of the rows, and the
# query's closer is deferred inside the statement loop, so it is closed only when the whole
# command returns. A command of 16 statements therefore holds up to 16 connections and needs
# one more for each write (stockflow's compare-and-set re-read, refetchForUpdate, is one more
# nested query). When concurrent commands together hold every connection of the pool
# (pool_max_conns), each waits in pgxpool.Acquire for a connection another holds: a deadlock,
# and a permanent one, as the command's context is cancelled only when its client connection
# is closed, which FerretDB notices only between commands. Seen on the local stack with
# pool_max_conns=180: all 180 PostgreSQL connections idle, waiting for FerretDB (ClientRead),
# 254 goroutines in Acquire under updateDocument, every client waiting. The same nesting, one
# connection deep, is in findAndModify (its query stays open through UpdateDocument or, with
# `remove`, through DeleteAll) and in updateUser (query open through UpdateAll); `delete`
# already does it right ("close read transaction before starting write transaction",
# msg_delete.go), and every other handler reads its query to the end before it writes.
#
# The patch:
# 1. UpdateDocument first reads every document the statement updates (up to its limit:
#    one without `multi`, as before) and closes the query, releasing its connection, then
#    updates from that slice (iterator.ConsumeValues and ForSlice, as FerretDB's own
#    SortIterator does). Covers `update`, findAndModify's update and the compare-and-set's
#    re-read, which now runs with no other connection held.
# 2. updateDocument closes each statement's query when the statement is done instead of
#    deferring it to the end of the command (no `defer` in the loop).
# 3. findAndModify with `remove` and updateUser close their query before they write.
# So a command holds at most one pooled connection at any moment and never waits for a second
# while holding one: on any pool (of 2 or more, below), commands queue for it and all complete.
#
# Why it is safe: the documents and their order are exactly those of before. A query's rows
# come from one PostgreSQL statement, whose snapshot is taken when it starts; reading them all
# first or one by one between the writes yields the same rows (the writes go through other
# connections in both cases and are not seen by it). Closing an iterator twice is allowed
# (the callers' closers close it again; every FerretDB iterator's Close is idempotent), and a
# panic inside ConsumeValues still closes the query (it defers the close).
# Cost: a `multi: true` statement holds all its matching documents in memory at once instead
# of one at a time (stockflow's statements match one document each). Still needed: a pool of
# at least 2 connections (FerretDB's first metadata load, initDBs, runs a query per row of
# another).

_CONSUME_FIRST_AT = """\
	result := new(UpdateResult)
"""

_CONSUME_FIRST = """\
	result := new(UpdateResult)

	// stockflow: read every document this statement updates (up to its limit) and close iter
	// now, releasing the pooled connection its query holds: every write below takes one of its
	// own, and waiting for it while holding this one deadlocks once the pool is exhausted.
	docs, err := iterator.ConsumeValues(iter)
	if err != nil {
		return nil, lazyerrors.Error(err)
	}

	iter = iterator.Values(iterator.ForSlice(docs))
	defer iter.Close()
"""

_DEFER_IN_LOOP = """\
		closer := iterator.NewMultiCloser()
		defer closer.Close()
"""

_NO_DEFER_IN_LOOP = """\
		closer := iterator.NewMultiCloser()
"""

_STATEMENT_DONE_AT = """\
		result, err := common.UpdateDocument(ctx, c, "update", iter, &u)
"""

_STATEMENT_DONE = (
    _STATEMENT_DONE_AT
    + """
		// stockflow: this statement's query is done: close it now, not when the whole command
		// returns (a deferred close here kept one connection per statement until then).
		closer.Close()

"""
)

_REMOVE_NEXT = """\
		_, doc, err = iter.Next()
"""

_REMOVE_NEXT_CLOSED = (
    _REMOVE_NEXT
    + """
		// stockflow: release the query's pooled connection before DeleteAll takes another.
		iter.Close()

"""
)

_UPDATE_USER_WRITE = """\
	_, err = usersCol.UpdateAll(connCtx, &backends.UpdateAllParams{Docs: []*types.Document{saved}})
"""

_UPDATE_USER_WRITE_CLOSED = (
    """\
	// stockflow: release the query's pooled connection before UpdateAll takes another.
	qr.Iter.Close()

"""
    + _UPDATE_USER_WRITE
)


# stockflow: a compare-and-set that holds on FerretDB too.
#
# FerretDB v1 answers `update` and `findAndModify` by reading the matching documents, applying
# the update to each in Go (handler/common/update.go, UpdateDocument) and writing each back by
# `_id` alone (the backends' UpdateAll). Nothing checks that the stored document is still the
# one that was read, so of two concurrent updates of one document both "match" and the later
# write silently undoes the earlier (FerretDB issue #3040): `update_one({_id, stock: 5},
# {$set: {stock: 4}})` from two writers reports two matches and one lost decrement, where
# MongoDB matches one and reports the other as not matched.
#
# The patch makes the write itself the test, as a database's compare-and-set must be:
# 1. UpdateDocument keeps a copy of each document as read and passes it down
#    (UpdateAllParams.OldDocs, a new field; a caller that leaves it empty, such as
#    updateUser, gets the old unconditional write).
# 2. The backends write only if the stored document is still that copy:
#    PostgreSQL `UPDATE ... SET _jsonb = $1 WHERE _jsonb->'_id' = $2 AND _jsonb = $3`
#    (jsonb equality is structural: key order and number spelling do not matter; the `_id`
#    index still finds the row, the comparison is on that one row), SQLite the same on the
#    stored JSON text (FerretDB writes a document's JSON deterministically, so an unchanged
#    document's text is exactly the read copy written again). A lost race updates no row.
# 3. When no row was updated, UpdateDocument does what MongoDB does after a write conflict:
#    it reads the document again by `_id` and, if it still matches the command's filter,
#    applies the update to the fresh copy (again conditionally); if it no longer matches (or
#    is gone), it is not matched: `n` and `nModified` do not count it, findAndModify returns
#    no document. So a compare-and-set whose condition another writer falsified matches
#    nothing, and an unconditional `$inc` from many writers loses nothing.
#    Every retry follows another writer's success, so the server as a whole always makes
#    progress; one document losing 1,000 races in a row ends its command with an error
#    rather than spinning.
# Cost: one more copy and JSON encoding of the document per update, a jsonb comparison of
# one row, and a re-read only when a race was actually lost (see docs/ferretdb-backends.md).
# Not covered, as before: findAndModify with `remove` (a delete by `_id`, idempotent), and a
# `multi: false` update whose document stops matching is not re-run against other documents
# the filter might now match (MongoDB would re-run the query).

_PARAMS = """\
type UpdateAllParams struct {
	Docs []*types.Document
}
"""

_PARAMS_CAS = """\
type UpdateAllParams struct {
	Docs []*types.Document

	// stockflow: OldDocs, if set, holds each document of Docs as it was read, before the update
	// changed it. A backend then writes a document only if it is still stored as read, and does
	// not count it in UpdateAllResult.Updated otherwise (another writer changed it in between).
	OldDocs []*types.Document
}
"""

_LOOP_HEAD = """\
	for {
		var upsert, modified bool

		_, doc, err := iter.Next()
		if err != nil {
"""

_LOOP_HEAD_CAS = """\
	// stockflow: a document whose conditional write lost a race and that still matches the
	// filter when read again is updated again before the next document of iter.
	var again *types.Document
	var lost int

	for {
		var upsert, modified bool
		var old *types.Document

		var doc *types.Document
		var err error

		if doc, again = again, nil; doc == nil {
			_, doc, err = iter.Next()
		}

		if err != nil {
"""

_MATCHED = """\
			result.Matched.Count++
"""

_MATCHED_CAS = """\
			result.Matched.Count++

			// stockflow: the document as read, for the write to be conditional on
			old = doc.DeepCopy()
"""

_WRITE = """\
			_, err := c.UpdateAll(ctx, &backends.UpdateAllParams{Docs: []*types.Document{doc}})
			if err != nil {
				return nil, lazyerrors.Error(err)
			}
"""

_WRITE_CAS = """\
			params := &backends.UpdateAllParams{
				Docs:    []*types.Document{doc},
				OldDocs: []*types.Document{old},
			}

			res, err := c.UpdateAll(ctx, params)
			if err != nil {
				return nil, lazyerrors.Error(err)
			}

			// stockflow: another writer changed or deleted the document since it was read. As
			// MongoDB after a write conflict: read it again, update it if it still matches the
			// filter, and otherwise it is not matched.
			if res.Updated == 0 {
				result.Matched.Count--
				result.Matched.Doc = nil

				if lost++; lost >= maxLostRaces {
					return nil, lazyerrors.Errorf("stockflow: update lost %d races in a row", lost)
				}

				id := must.NotFail(old.Get("_id"))
				if again, err = refetchForUpdate(ctx, c, id, param.Filter); err != nil {
					return nil, lazyerrors.Error(err)
				}

				continue
			}

			lost = 0
"""

_NEXT_FUNC = """\
// processFilterEqualityCondition copies the fields with equality condition from filter to doc.
"""

_REFETCH = """\
// maxLostRaces bounds how many races in a row an update may lose for one document (each lost
// race means another writer's update of it succeeded) before it fails instead of retrying.
//
// stockflow patch.
const maxLostRaces = 1000

// refetchForUpdate reads the document with this _id again and returns it if it still matches
// filter; nil if it no longer does or is gone.
//
// stockflow patch.
func refetchForUpdate(
	ctx context.Context, c backends.Collection, id any, filter *types.Document,
) (*types.Document, error) {
	byID := must.NotFail(types.NewDocument("_id", id))

	res, err := c.Query(ctx, &backends.QueryParams{Filter: byID})
	if err != nil {
		return nil, lazyerrors.Error(err)
	}

	defer res.Iter.Close()

	for {
		_, doc, err := res.Iter.Next()
		if errors.Is(err, iterator.ErrIteratorDone) {
			return nil, nil
		}

		if err != nil {
			return nil, lazyerrors.Error(err)
		}

		// a backend may return more than the pushed-down filter asks for
		same, err := FilterDocument(doc, byID)
		if err != nil {
			return nil, lazyerrors.Error(err)
		}

		if !same {
			continue
		}

		matches, err := FilterDocument(doc, filter)
		if err != nil {
			return nil, lazyerrors.Error(err)
		}

		if !matches {
			return nil, nil
		}

		return doc, nil
	}
}

"""

_PG_EXEC = """\
		tag, err := p.Exec(ctx, q, b, must.NotFail(sjson.MarshalSingleValue(id)))
		if err != nil {
			return nil, lazyerrors.Error(err)
		}
"""

_PG_EXEC_CAS = """\
		cq, args := q, []any{b, must.NotFail(sjson.MarshalSingleValue(id))}

		// stockflow: only if the row is still the document as read (UpdateAllParams.OldDocs);
		// jsonb equality is structural, so key order and number spelling do not matter.
		if len(params.OldDocs) == 1 {
			var ob []byte
			if ob, err = sjson.Marshal(params.OldDocs[0]); err != nil {
				return nil, lazyerrors.Error(err)
			}

			cq += fmt.Sprintf(" AND %s = $3", metadata.DefaultColumn)
			args = append(args, ob)
		}

		tag, err := p.Exec(ctx, cq, args...)
		if err != nil {
			return nil, lazyerrors.Error(err)
		}
"""

_PG_MANY = """\
		res.Updated = int32(tag.RowsAffected())

		return &res, nil
	}

"""

_PG_MANY_CAS = (
    _PG_MANY
    + """\
	if len(params.OldDocs) != 0 {
		return nil, lazyerrors.New("stockflow: conditional update of several documents at once")
	}

"""
)

_SQLITE_LOOP = """\
		for _, doc := range params.Docs {
			b, err := sjson.Marshal(doc)
			if err != nil {
				return lazyerrors.Error(err)
			}

			id, _ := doc.Get("_id")
			must.NotBeZero(id)

			arg := string(must.NotFail(sjson.MarshalSingleValue(id)))

			r, err := tx.ExecContext(ctx, q, string(b), arg)
"""

_SQLITE_LOOP_CAS = """\
		for i, doc := range params.Docs {
			b, err := sjson.Marshal(doc)
			if err != nil {
				return lazyerrors.Error(err)
			}

			id, _ := doc.Get("_id")
			must.NotBeZero(id)

			arg := string(must.NotFail(sjson.MarshalSingleValue(id)))

			// stockflow: only if the row is still the document as read (UpdateAllParams.OldDocs);
			// FerretDB writes a document's JSON deterministically, so the stored text of an
			// unchanged document is exactly the read copy marshaled again.
			cq, args := q, []any{string(b), arg}
			if params.OldDocs != nil {
				var ob []byte
				if ob, err = sjson.Marshal(params.OldDocs[i]); err != nil {
					return lazyerrors.Error(err)
				}

				cq += fmt.Sprintf(" AND %s = ?", metadata.DefaultColumn)
				args = append(args, string(ob))
			}

			r, err := tx.ExecContext(ctx, cq, args...)
"""

SPEED_PATCHES = (
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
"""Faster, same results."""

POOL_PATCHES = (
    Patch("internal/handler/common/update.go", _CONSUME_FIRST_AT, _CONSUME_FIRST),
    Patch("internal/handler/msg_update.go", _DEFER_IN_LOOP, _NO_DEFER_IN_LOOP),
    Patch("internal/handler/msg_update.go", _STATEMENT_DONE_AT, _STATEMENT_DONE),
    Patch("internal/handler/msg_findandmodify.go", _REMOVE_NEXT, _REMOVE_NEXT_CLOSED),
    Patch("internal/handler/msg_updateuser.go", _UPDATE_USER_WRITE, _UPDATE_USER_WRITE_CLOSED),
)
"""No pooled connection held while another is acquired: the deadlock fix above.

Independent of the other patches (its anchors are code none of them changes)."""

CAS_PATCHES = (
    Patch("internal/backends/collection.go", _PARAMS, _PARAMS_CAS),
    Patch("internal/handler/common/update.go", _LOOP_HEAD, _LOOP_HEAD_CAS),
    Patch("internal/handler/common/update.go", _MATCHED, _MATCHED_CAS),
    Patch("internal/handler/common/update.go", _WRITE, _WRITE_CAS),
    Patch("internal/handler/common/update.go", _NEXT_FUNC, _REFETCH + _NEXT_FUNC),
    Patch("internal/backends/postgresql/collection.go", _PG_EXEC, _PG_EXEC_CAS),
    Patch("internal/backends/postgresql/collection.go", _PG_MANY, _PG_MANY_CAS),
    Patch("internal/backends/sqlite/collection.go", _SQLITE_LOOP, _SQLITE_LOOP_CAS),
)
"""A conditional write, retried on a fresh read as MongoDB does: the compare-and-set above.

Applied after :data:`SPEED_PATCHES` (the PostgreSQL part patches their one-document path)."""


@dataclass(frozen=True)
class Build:
    """A patch level of the FerretDB build, and the name of its cache folder."""

    tag: str
    patches: tuple[Patch, ...]


BUILD = Build("stockflow4", SPEED_PATCHES + POOL_PATCHES + CAS_PATCHES)
"""What the local stack runs; a changed patch needs a new tag, so cached builds are not reused.

A tag has no ``-`` in it: the cache folder is ``ferretdb-<version>-<tag>``."""

WITHOUT_CAS = Build("stockflow4nocas", SPEED_PATCHES + POOL_PATCHES)
""":data:`BUILD` without the compare-and-set patch, for the side-by-side benchmark of its cost."""

WITHOUT_POOL_FIX = Build("stockflow3", SPEED_PATCHES + CAS_PATCHES)
"""The build before the deadlock fix (the local stack's until then), to show the deadlock."""


def apply_patches(source: Path, patches: tuple[Patch, ...] = BUILD.patches) -> None:
    """Apply ``patches`` to a writable copy of the FerretDB module source."""
    for patch in patches:
        target = source / patch.path
        text = target.read_text()
        if text.count(patch.anchor) != 1:
            raise ProvisionError(
                f"ferretdb: cannot patch {patch.path}: the expected code is not there "
                "(a different FerretDB version?)"
            )
        target.write_text(text.replace(patch.anchor, patch.replacement))
