/**
 * Deterministic simulation of a replica move's copy (src/replica/move.ts, driven as
 * src/daemon/mover.ts drives it): the claim is that when the cutover completes, the target holds
 * exactly the source's bytes, however client writes and trims interleave with the passes.
 *
 * The model, per seed: a small volume (bytes, an allocation bit per chunk) under a stream of
 * writes and trims. A write lands in two halves at separate steps (a concurrent read may see one
 * half), then finishes and marks its range (`changed`), as volume.ts's observer does. The copier
 * takes a pass, queries the allocation, reads pieces at one step and delivers them to the target
 * at a later one, several in flight, out of order. When `readyForCutover`, client writes pause,
 * the ones in flight finish, the final pass runs, and the target must equal the source.
 *
 * Negative control: marking a write when it starts instead of when it finished is caught.
 *
 * DUPLEX_SEED=<n> DUPLEX_SIM_SEEDS=1 replays one seed; a failure prints that command.
 */
import t from 'tap'
import { MoveCopy } from '../../src/replica/move.js'
import type { DirtyRange } from '../../src/replica/dirty-map.js'
import { Prng, testSeed } from '../lib/prng.js'

const chunkBytes = 64
const sizeBytes = chunkBytes * 48
const pieceBytes = 128

class Failure extends Error {}

interface Write {
  offset: number
  data: Uint8Array
  /** A trim: the range reads as zeros and its chunks may become holes. */
  trim: boolean
  /** How many halves landed (0, 1, 2). */
  landed: number
}

interface Piece {
  offset: number
  length: number
  /** What the read saw (undefined: a hole, punched on the target). */
  data: Uint8Array | undefined
}

interface Mutation {
  /** Mark a write's range when it starts instead of when it finished (the broken rule). */
  markAtStart?: boolean
}

function runSeed(seed: number, mutation: Mutation = {}): { passes: number; writes: number } {
  const prng = new Prng(seed)
  const source = new Uint8Array(sizeBytes)
  const allocated = new Array<boolean>(sizeBytes / chunkBytes).fill(false)
  const target = new Uint8Array(sizeBytes)
  const copy = new MoveCopy(sizeBytes, {
    chunkBytes,
    cutoverBytes: chunkBytes * (1 + prng.int(6)),
    passesMax: 2 + prng.int(6),
    cutoverBytesMax: chunkBytes * (8 + prng.int(24)),
  })
  // Some data before the move starts.
  for (let i = 0; i < 6; i++) {
    const offset = prng.int(sizeBytes - 200)
    const length = 1 + prng.int(200)
    source.fill(1 + prng.int(250), offset, offset + length)
    markAllocated(allocated, offset, length)
  }
  const inFlight: Write[] = []
  const delivering: Piece[] = []
  let pass: { pending: Piece[]; first: boolean } | undefined
  let paused = false
  let writes = 0
  const writeRate = prng.next() * 0.6

  const land = (write: Write, half: number): void => {
    const halfBytes = Math.ceil(write.data.length / 2)
    const from = half * halfBytes
    const to = Math.min(write.data.length, from + halfBytes)
    source.set(write.data.subarray(from, to), write.offset + from)
    if (!write.trim) markAllocated(allocated, write.offset + from, to - from)
  }
  const finish = (write: Write): void => {
    if (write.trim) {
      // A punched chunk is a hole once entirely zero (as the allocation map frees covered chunks).
      for (let c = 0; c < allocated.length; c++) {
        const chunk = source.subarray(c * chunkBytes, (c + 1) * chunkBytes)
        if (allocated[c] && chunk.every((byte) => byte === 0)) allocated[c] = false
      }
    }
    if (!mutation.markAtStart) copy.changed(write.offset, write.data.length)
  }
  /** Pieces of a pass's ranges, split by allocation at the time the pass reaches them. */
  const piecesOf = (ranges: DirtyRange[]): Piece[] =>
    ranges.flatMap((range) => {
      const pieces: Piece[] = []
      for (let at = range.offset; at < range.offset + range.length; at += pieceBytes) {
        pieces.push({
          offset: at,
          length: Math.min(pieceBytes, range.offset + range.length - at),
          data: undefined,
        })
      }
      return pieces
    })

  for (let step = 0; step < 20_000; step++) {
    // Client writes (not while paused for the cutover).
    if (!paused && prng.bool(writeRate)) {
      const length = 1 + prng.int(prng.bool(0.2) ? 300 : 40)
      const offset = prng.int(sizeBytes - length)
      const trim = prng.bool(0.15)
      const write: Write = {
        offset,
        data: new Uint8Array(length).fill(trim ? 0 : 1 + prng.int(250)),
        trim,
        landed: 0,
      }
      if (mutation.markAtStart) copy.changed(offset, length)
      inFlight.push(write)
      writes += 1
    }
    // A write in flight makes progress.
    if (inFlight.length > 0 && prng.bool(0.7)) {
      const index = prng.int(inFlight.length)
      const write = inFlight[index]
      if (write !== undefined) {
        if (write.landed < 2) land(write, write.landed++)
        else {
          finish(write)
          inFlight.splice(index, 1)
        }
      }
    }
    // The copier.
    if (pass === undefined && delivering.length === 0) {
      if (copy.readyForCutover()) {
        paused = true
        if (inFlight.length > 0) continue // the primary drains what is in flight
        // The final pass: nothing moves any more.
        const first = copy.passes === 0
        for (const piece of piecesOf(copy.takePass())) {
          deliver(target, read(source, allocated, piece, first))
        }
        if (copy.remainingBytes !== 0) throw new Failure('dirty after the final pass')
        const diff = firstDifference(source, target)
        if (diff !== undefined) {
          throw new Failure(
            `after the cutover the target differs at byte ${diff}: ` +
              `source ${source[diff]}, target ${target[diff]} (${copy.passes} passes, ${writes} writes)`,
          )
        }
        return { passes: copy.passes, writes }
      }
      const first = copy.passes === 0
      pass = { pending: piecesOf(copy.takePass()), first }
    }
    if (pass !== undefined && prng.bool(0.6)) {
      const piece = pass.pending.shift()
      if (piece === undefined) pass = undefined
      else delivering.push(read(source, allocated, piece, pass.first))
    }
    if (delivering.length > 0 && prng.bool(0.5)) {
      const [piece] = delivering.splice(prng.int(delivering.length), 1)
      if (piece !== undefined) deliver(target, piece)
    }
    if (pass !== undefined && pass.pending.length === 0 && delivering.length === 0) pass = undefined
  }
  throw new Failure(`no cutover after 20000 steps (${copy.passes} passes, writes ${writes})`)
}

function markAllocated(allocated: boolean[], offset: number, length: number): void {
  for (let c = Math.floor(offset / chunkBytes); c * chunkBytes < offset + length; c++) {
    allocated[c] = true
  }
}

/** The copier reads a piece: a hole (skipped on the first pass) or the bytes there now. */
function read(
  source: Uint8Array,
  allocated: boolean[],
  piece: Piece,
  firstPass: boolean,
): Piece & { skip?: boolean } {
  const first = Math.floor(piece.offset / chunkBytes)
  const last = Math.floor((piece.offset + piece.length - 1) / chunkBytes)
  let hole = true
  for (let c = first; c <= last; c++) if (allocated[c]) hole = false
  if (hole) return { ...piece, data: undefined, skip: firstPass }
  return { ...piece, data: source.slice(piece.offset, piece.offset + piece.length) }
}

function deliver(target: Uint8Array, piece: Piece & { skip?: boolean }): void {
  if (piece.skip === true) return
  if (piece.data === undefined) target.fill(0, piece.offset, piece.offset + piece.length)
  else target.set(piece.data, piece.offset)
}

function firstDifference(a: Uint8Array, b: Uint8Array): number | undefined {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i
  return undefined
}

const replay = process.env['DUPLEX_SEED'] !== undefined
const seeds = Number(process.env['DUPLEX_SIM_SEEDS'] ?? (replay ? 1 : 3000))
const firstSeed = testSeed()
t.comment(`first seed ${firstSeed}`)

t.test('a moved replica equals its source at the cutover', async (t) => {
  let passes = 0
  let writes = 0
  for (let i = 0; i < seeds; i++) {
    const seed = firstSeed + i
    try {
      const result = runSeed(seed)
      passes += result.passes
      writes += result.writes
    } catch (error) {
      if (!(error instanceof Failure)) throw error
      const command = `DUPLEX_SEED=${seed} DUPLEX_SIM_SEEDS=1 npx tap dist/test/sim/move.test.js`
      t.fail(`seed ${seed}: ${error.message}\nreplay: ${command}`)
      return
    }
  }
  t.comment(`${seeds} seeds: ${passes} passes, ${writes} client writes and trims during copies`)
  t.ok(writes > 0 && passes > seeds, 'writes raced the copy, over several passes')
})

t.test('negative control: marking a write when it starts is caught', async (t) => {
  let caught: string | undefined
  for (let i = 0; i < 2000 && caught === undefined; i++) {
    try {
      runSeed(firstSeed + i, { markAtStart: true })
    } catch (error) {
      if (!(error instanceof Failure)) throw error
      caught = error.message
    }
  }
  t.ok(caught !== undefined, `the check fails on the broken rule: ${caught ?? 'not caught'}`)
})
