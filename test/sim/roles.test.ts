/**
 * Deterministic simulation of the two role changes the drivers build on the replication cores:
 * the handover (`volume promote`: drain, flush both, epoch + 1 with the roles swapped) and the
 * initial sync of an empty peer (copies through the primary's core, read once the core holds the
 * range). It drives the REAL pure cores (PrimaryReplication, SecondaryReplication) with a tiny
 * model: block-granular disks whose writes land in random completion order, FIFO streams both
 * ways with random interleaving, and a client that never overlaps its own in-flight writes.
 *
 * Invariants, checked for every seed:
 * - every acknowledged write is on both replicas at the end, and both replicas are identical
 *   (also after a sync that ran while the client kept writing);
 * - only the primary of the current epoch acknowledges writes, at most one primary per epoch;
 * - after a handover, an op of the old epoch reaching the new secondary is refused (EPOCH_STALE).
 * Negative controls run the sync with the copy read BEFORE the core orders it, and a handover
 * that starts the new primary before the old one drained; the same checks must catch both.
 *
 * Replay a seed: DUPLEX_SEED=<seed> npx tap dist/test/sim/roles.test.js
 */
import t from 'tap'
import { PrimaryReplication, SecondaryReplication } from '../../src/replica/replication.js'
import type { PrimaryEffect, SecondaryEffect } from '../../src/replica/replication.js'
import { Prng, testSeed } from '../lib/prng.js'

const blockBytes = 4096
const blocks = 64
const seedsPerRun = Number(process.env['DUPLEX_SIM_SEEDS'] ?? 2000)

type Disk = Int32Array

interface Message {
  kind: 'op' | 'flush' | 'ack' | 'flushAck' | 'reject'
  epoch: number
  seq: number
  offset: number
  length: number
  /** Payload: one value per block. */
  data: number[] | undefined
  code?: string
}

interface Pending {
  resolve: (ok: boolean) => void
  data: number[] | undefined
  /** A sync copy: its data is read from the primary's disk when the core issues it. */
  sync: boolean
}

/** One primary/secondary pair of cores in one epoch, with their disks and streams. */
class Pair {
  readonly primary: PrimaryReplication
  readonly secondary: SecondaryReplication
  readonly toSecondary: Message[] = []
  readonly toPrimary: Message[] = []
  readonly requests = new Map<number, Pending>()
  /** Local I/O not yet completed: each runs when picked. */
  readonly io: (() => void)[] = []
  /** Sends waiting for a sync copy's read. */
  readonly deferred = new Map<number, Extract<PrimaryEffect, { type: 'sendToPeer' }>>()
  readonly acked: { epoch: number; by: string }[] = []
  readonly staleRefusals: string[] = []

  constructor(
    readonly epoch: number,
    readonly primaryName: string,
    readonly primaryDisk: Disk,
    readonly secondaryDisk: Disk,
    readonly prng: Prng,
    readonly readSyncEarly: boolean,
  ) {
    this.primary = new PrimaryReplication({ epoch, extentBytes: 16 * blockBytes })
    this.secondary = new SecondaryReplication({ epoch, primary: primaryName })
    this.onPrimary(this.primary.step({ type: 'peerConnected' }))
  }

  private nextRequest = 1

  submit(offset: number, data: number[], sync: boolean): Promise<boolean> {
    const requestId = this.nextRequest++
    const length = data.length * blockBytes
    return new Promise((resolve) => {
      const pending: Pending = {
        resolve,
        data: sync && !this.readSyncEarly ? undefined : data,
        sync,
      }
      if (sync && this.readSyncEarly) {
        pending.data = readBlocks(this.primaryDisk, offset, data.length) // the bug under test
      }
      this.requests.set(requestId, pending)
      this.onPrimary(
        this.primary.step({
          type: 'clientWrite',
          requestId,
          kind: 'write',
          offset,
          length,
          fua: false,
        }),
      )
    })
  }

  flush(): Promise<boolean> {
    const requestId = this.nextRequest++
    return new Promise((resolve) => {
      this.requests.set(requestId, { resolve, data: undefined, sync: false })
      this.onPrimary(this.primary.step({ type: 'clientFlush', requestId }))
    })
  }

  /** One random step; false when nothing is left to do. */
  step(): boolean {
    const choices: (() => void)[] = []
    if (this.io.length > 0) {
      choices.push(() => {
        const index = this.prng.int(this.io.length)
        const [run] = this.io.splice(index, 1)
        run?.()
      })
    }
    if (this.toSecondary.length > 0) {
      choices.push(() => {
        this.deliverToSecondary()
      })
    }
    if (this.toPrimary.length > 0) {
      choices.push(() => {
        this.deliverToPrimary()
      })
    }
    if (choices.length === 0) return false
    choices[this.prng.int(choices.length)]?.()
    return true
  }

  private onPrimary(effects: PrimaryEffect[]): void {
    for (const effect of effects) {
      switch (effect.type) {
        case 'persistActivityLog':
          this.io.push(() => {
            this.onPrimary(
              this.primary.step({
                type: 'activityLogPersisted',
                extents: effect.extents,
                coldExtents: effect.coldExtents,
              }),
            )
          })
          break
        case 'writeLocal': {
          const request = this.requests.get(effect.requestId)
          if (request?.sync === true) {
            // The copy: read this replica now that the core holds the range, then let it go.
            this.io.push(() => {
              if (!this.readSyncEarly) {
                request.data = readBlocks(
                  this.primaryDisk,
                  effect.offset,
                  effect.length / blockBytes,
                )
              }
              const send = this.deferred.get(effect.requestId)
              this.deferred.delete(effect.requestId)
              if (send !== undefined) this.send(send)
              this.onPrimary(
                this.primary.step({ type: 'localDone', requestId: effect.requestId, ok: true }),
              )
            })
          } else {
            const data = request?.data ?? []
            this.io.push(() => {
              writeBlocks(this.primaryDisk, effect.offset, data)
              this.onPrimary(
                this.primary.step({ type: 'localDone', requestId: effect.requestId, ok: true }),
              )
            })
          }
          break
        }
        case 'sendToPeer': {
          const request = this.requests.get(effect.requestId)
          if (request?.sync === true && request.data === undefined) {
            this.deferred.set(effect.requestId, effect)
          } else {
            this.send(effect)
          }
          break
        }
        case 'flushLocal':
          this.io.push(() => {
            this.onPrimary(
              this.primary.step({ type: 'localFlushDone', flushId: effect.flushId, ok: true }),
            )
          })
          break
        case 'sendFlushToPeer':
          this.toSecondary.push({
            kind: 'flush',
            epoch: effect.epoch,
            seq: effect.flushId,
            offset: 0,
            length: 0,
            data: undefined,
          })
          break
        case 'disconnectPeer':
          throw new Error(`unexpected disconnect: ${effect.code}`)
        case 'reply': {
          const request = this.requests.get(effect.requestId)
          this.requests.delete(effect.requestId)
          if (effect.ok) this.acked.push({ epoch: this.epoch, by: this.primaryName })
          request?.resolve(effect.ok)
          break
        }
      }
    }
  }

  private send(effect: Extract<PrimaryEffect, { type: 'sendToPeer' }>): void {
    const data = this.requests.get(effect.requestId)?.data
    this.toSecondary.push({
      kind: 'op',
      epoch: effect.epoch,
      seq: effect.seq,
      offset: effect.offset,
      length: effect.length,
      data: data === undefined ? undefined : [...data],
    })
  }

  /** Delivers an op to the secondary core as if it came from `from` (tests: a stale sender). */
  receive(message: Message, from: string): SecondaryEffect[] {
    return this.secondary.step({
      type: 'receive',
      epoch: message.epoch,
      seq: message.seq,
      from,
      kind: 'write',
      offset: message.offset,
      length: message.length,
      fua: false,
      checksumOk: true,
    })
  }

  private readonly payloads = new Map<number, number[]>()

  private deliverToSecondary(): void {
    const message = this.toSecondary.shift()
    if (message === undefined) return
    if (message.kind === 'flush') {
      this.onSecondary(
        this.secondary.step({
          type: 'receiveFlush',
          epoch: message.epoch,
          flushId: message.seq,
          from: this.primaryName,
        }),
      )
      return
    }
    if (message.data !== undefined) this.payloads.set(message.seq, message.data)
    this.onSecondary(this.receive(message, this.primaryName))
  }

  private onSecondary(effects: SecondaryEffect[]): void {
    for (const effect of effects) {
      switch (effect.type) {
        case 'writeLocal': {
          const data = this.payloads.get(effect.seq) ?? []
          this.payloads.delete(effect.seq)
          this.io.push(() => {
            writeBlocks(this.secondaryDisk, effect.offset, data)
            this.onSecondary(
              this.secondary.step({
                type: 'localDone',
                epoch: effect.epoch,
                seq: effect.seq,
                ok: true,
              }),
            )
          })
          break
        }
        case 'flushLocal':
          this.io.push(() => {
            this.onSecondary(
              this.secondary.step({
                type: 'localFlushDone',
                epoch: effect.epoch,
                flushId: effect.flushId,
                ok: true,
              }),
            )
          })
          break
        case 'ack':
          this.toPrimary.push({
            kind: 'ack',
            epoch: effect.epoch,
            seq: effect.seq,
            offset: 0,
            length: 0,
            data: undefined,
          })
          break
        case 'flushAck':
          this.toPrimary.push({
            kind: 'flushAck',
            epoch: effect.epoch,
            seq: effect.flushId,
            offset: 0,
            length: 0,
            data: undefined,
          })
          break
        case 'reject':
        case 'rejectFlush':
          throw new Error(`unexpected refusal: ${effect.code}`)
      }
    }
  }

  private deliverToPrimary(): void {
    const message = this.toPrimary.shift()
    if (message === undefined) return
    if (message.kind === 'ack') {
      this.onPrimary(this.primary.step({ type: 'peerAck', epoch: message.epoch, seq: message.seq }))
    } else {
      this.onPrimary(
        this.primary.step({ type: 'peerFlushAck', epoch: message.epoch, flushId: message.seq }),
      )
    }
  }
}

function readBlocks(disk: Disk, offset: number, count: number): number[] {
  const first = offset / blockBytes
  return Array.from(disk.subarray(first, first + count))
}

function writeBlocks(disk: Disk, offset: number, data: number[]): void {
  disk.set(data, offset / blockBytes)
}

/** Runs steps until `done` (a promise that settles when the condition holds) or nothing is left. */
async function runUntil(pair: Pair, done: Promise<unknown>): Promise<void> {
  const state = { settled: false }
  void done.then(() => (state.settled = true))
  for (let steps = 0; steps < 1_000_000 && !state.settled; steps++) {
    await Promise.resolve() // let settled promises run their continuations
    if (!pair.step()) await Promise.resolve()
  }
  await done
}

interface Outcome {
  ok: boolean
  why: string
}

/** One seed: writes, a sync of an empty peer under writes, a handover, more writes. */
interface Faults {
  /** The bug under test: the sync copy reads before the core orders it. */
  readSyncEarly?: boolean
  /** The bug under test: the new primary starts while the old one still has writes in flight. */
  handoverWithoutDrain?: boolean
}

let ackedTotal = 0

async function simulate(seed: number, faults: Faults = {}): Promise<Outcome> {
  const readSyncEarly = faults.readSyncEarly ?? false
  const prng = new Prng(seed)
  const diskA: Disk = new Int32Array(blocks)
  const diskB: Disk = new Int32Array(blocks)
  const model = new Int32Array(blocks)
  // Data the peer never saw (it was just replaced by an empty one).
  for (let b = 0; b < blocks; b++) if (prng.bool(0.5)) diskA[b] = model[b] = 1_000_000 + b
  let value = 1
  const busy = new Set<number>()
  /** Client writes; `copies` sync chunks are started at random points among them. */
  const clientWrites = async (pair: Pair, count: number, copies: number[] = []): Promise<void> => {
    const inflight: Promise<void>[] = []
    const pendingCopies = [...copies]
    for (let i = 0; i < count || pendingCopies.length > 0; i++) {
      if (pendingCopies.length > 0 && (i >= count || prng.bool(0.2))) {
        const first = pendingCopies.shift() ?? 0
        const copy = pair.submit(first * blockBytes, new Array<number>(8).fill(0), true)
        inflight.push(
          copy.then((ok) => {
            if (!ok) throw new Error('a sync copy failed')
          }),
        )
      }
      if (i >= count) continue
      const length = 1 + prng.int(4)
      const first = prng.int(blocks - length + 1)
      const range = Array.from({ length }, (_, k) => first + k)
      if (range.some((b) => busy.has(b))) continue // a client never overlaps its own writes
      for (const b of range) busy.add(b)
      const data = range.map(() => value++)
      inflight.push(
        pair.submit(first * blockBytes, data, false).then((ok) => {
          if (!ok) throw new Error('a write failed')
          for (const [k, b] of range.entries()) model[b] = data[k] ?? 0
          for (const b of range) busy.delete(b)
        }),
      )
      // Let the cores interleave this write with the others.
      for (let s = prng.int(6); s > 0; s--) pair.step()
    }
    await runUntil(pair, Promise.all(inflight))
  }

  // Epoch 1: a is primary; b is empty and gets the initial sync while the client writes.
  const one = new Pair(1, 'a', diskA, diskB, prng, readSyncEarly)
  const chunks = Array.from({ length: blocks / 8 }, (_, k) => k * 8)
  await clientWrites(one, 60, chunks)
  await runUntil(one, one.flush())
  if (!equal(diskA, diskB)) return { ok: false, why: 'replicas differ after the sync' }
  if (!equal(diskA, model)) {
    return { ok: false, why: 'an acknowledged write is missing after the sync' }
  }

  // Handover: everything replied, both flushed above; b becomes primary of epoch 2.
  let undrained: Promise<void> | undefined
  if (faults.handoverWithoutDrain === true) {
    // Writes through the old primary still in flight when the new one starts.
    const late: Promise<boolean>[] = []
    for (let i = 0; i < 10; i++) {
      const first = prng.int(blocks - 1)
      const data = [value++, value++]
      late.push(
        one.submit(first * blockBytes, data, false).then((ok) => {
          if (ok) for (const [k, b] of [first, first + 1].entries()) model[b] = data[k] ?? 0
          return ok
        }),
      )
    }
    undrained = Promise.all(late).then(() => undefined)
  }
  const staleOp = one.toSecondary.at(-1) ?? {
    kind: 'op',
    epoch: 1,
    seq: 1,
    offset: 0,
    length: blockBytes,
    data: [0],
  }
  const two = new Pair(2, 'b', diskB, diskA, prng, readSyncEarly)
  const stale = two.receive({ ...staleOp, kind: 'op', epoch: 1 }, 'a')
  if (!stale.some((effect) => effect.type === 'reject' && effect.code === 'EPOCH_STALE')) {
    return { ok: false, why: `an op of the old epoch was not refused: ${JSON.stringify(stale)}` }
  }
  if (undrained !== undefined) {
    // The new primary takes writes while the old one's are still landing (no drain): the
    // replicas must end identical whatever the order, which is what this breaks.
    const racing: Promise<boolean>[] = []
    for (let i = 0; i < 10; i++) {
      const first = prng.int(blocks - 1)
      racing.push(two.submit(first * blockBytes, [value++, value++], false))
    }
    const state = { done: false }
    void Promise.all([undrained, ...racing]).then(() => (state.done = true))
    for (let steps = 0; steps < 100_000 && !state.done; steps++) {
      await Promise.resolve()
      if (prng.bool()) one.step()
      else two.step()
    }
    await runUntil(two, two.flush())
    return equal(diskA, diskB)
      ? { ok: true, why: '' }
      : { ok: false, why: 'replicas differ after an undrained handover' }
  }
  await clientWrites(two, 40)
  await runUntil(two, two.flush())
  if (!equal(diskA, diskB)) return { ok: false, why: 'replicas differ after the handover' }
  if (!equal(diskB, model))
    return { ok: false, why: 'an acknowledged write is missing after the handover' }
  ackedTotal += one.acked.length + two.acked.length
  const primaries = new Map<number, Set<string>>()
  for (const { epoch, by } of [...one.acked, ...two.acked]) {
    primaries.set(epoch, (primaries.get(epoch) ?? new Set()).add(by))
  }
  for (const [epoch, by] of primaries) {
    if (by.size > 1) return { ok: false, why: `epoch ${epoch} had writers ${[...by].join(', ')}` }
  }
  return { ok: true, why: '' }
}

function equal(a: Int32Array, b: Int32Array): boolean {
  return a.length === b.length && a.every((value, index) => value === b[index])
}

t.test(
  'sync under writes, then a handover: no acknowledged write lost, replicas identical',
  async (t) => {
    const base = testSeed()
    t.comment(`seeds ${base}..${base + seedsPerRun - 1} (DUPLEX_SEED=<seed> replays one)`)
    let failures = 0
    for (let i = 0; i < seedsPerRun && failures < 3; i++) {
      const seed = base + i
      const outcome = await simulate(seed)
      if (!outcome.ok) {
        failures += 1
        t.fail(
          `seed ${seed}: ${outcome.why}\n  replay: DUPLEX_SEED=${seed} DUPLEX_SIM_SEEDS=1 npx tap dist/test/sim/roles.test.js`,
        )
      }
    }
    t.equal(failures, 0, `${seedsPerRun} seeds`)
    t.ok(ackedTotal > seedsPerRun * 40, `${ackedTotal} acknowledged writes were checked`)
  },
)

t.test('negative controls: the checks catch a broken sync and an undrained handover', async (t) => {
  const base = testSeed()
  for (const [what, faults] of [
    ['a sync copy read before the core orders it', { readSyncEarly: true }],
    ['a new primary starting before the old one drained', { handoverWithoutDrain: true }],
  ] as const) {
    let caught: Outcome | undefined
    for (let i = 0; i < seedsPerRun && caught === undefined; i++) {
      const outcome = await simulate(base + i, faults)
      if (!outcome.ok) caught = outcome
    }
    t.ok(caught, `${what} is caught (${caught?.why ?? 'never caught'})`)
  }
})
