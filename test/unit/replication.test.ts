import t from 'tap'
import {
  PrimaryReplication,
  SecondaryReplication,
  type BlockOp,
  type PrimaryEffect,
  type SecondaryEffect,
} from '../../src/replica/replication.js'
import { Prng, testSeed } from '../lib/prng.js'

// Effects print as one line each, so the tests read like etcd raft's testdata transcripts.

function op(o: BlockOp): string {
  return `${o.kind}@${o.offset}+${o.length}${o.fua ? ' fua' : ''}`
}

function show(effects: (PrimaryEffect | SecondaryEffect)[]): string[] {
  return effects.map((e) => {
    switch (e.type) {
      case 'persistActivityLog':
        return `persistActivityLog hot=[${e.extents.join(',')}] cold=[${e.coldExtents.join(',')}]`
      case 'writeLocal':
        return 'requestId' in e
          ? `writeLocal r${e.requestId} ${op(e)}`
          : `writeLocal e${e.epoch} s${e.seq} ${op(e)}`
      case 'sendToPeer':
        return `sendToPeer e${e.epoch} s${e.seq} r${e.requestId} ${op(e)}`
      case 'flushLocal':
        return 'epoch' in e ? `flushLocal e${e.epoch} f${e.flushId}` : `flushLocal f${e.flushId}`
      case 'sendFlushToPeer':
        return `sendFlushToPeer e${e.epoch} f${e.flushId}`
      case 'disconnectPeer':
        return `disconnectPeer ${e.code}`
      case 'markDirty':
        return `markDirty ${e.offset}+${e.length}`
      case 'reply':
        return `reply r${e.requestId} ${e.ok ? 'ok' : e.code}`
      case 'ack':
        return `ack e${e.epoch} s${e.seq}`
      case 'flushAck':
        return `flushAck e${e.epoch} f${e.flushId}`
      case 'reject':
        return `reject e${e.epoch} s${e.seq} ${e.code}`
      case 'rejectFlush':
        return `rejectFlush e${e.epoch} f${e.flushId} ${e.code}`
    }
  })
}

const KiB = 1024
const w = (requestId: number, offset: number, length: number, fua = false) => ({
  requestId,
  offset,
  length,
  fua,
  kind: 'write' as const,
})

/**
 * Makes `extents` hot the way a running primary does (extents loaded at start are pinned until
 * resync, so they cannot stand in for this): one FUA write into each, done on both sides.
 * Returns the next seq.
 */
function heat(
  p: PrimaryReplication,
  epoch: number,
  extents: number[],
  extentBytes: number,
): number {
  let seq = 1
  for (const [i, extent] of extents.entries()) {
    const requestId = 900 + i
    p.clientWrite(w(requestId, extent * extentBytes, 4096, true))
    p.activityLogPersisted({ extents: [extent], coldExtents: [] })
    p.localDone({ requestId, ok: true })
    p.peerAck({ epoch, seq })
    seq += 1
  }
  return seq
}

/** A connected primary in epoch 7 whose extent 0 (1 MiB) is already hot. */
function hotPrimary(options: Partial<ConstructorParameters<typeof PrimaryReplication>[0]> = {}) {
  const p = new PrimaryReplication({
    epoch: 7,
    extentBytes: 1024 * KiB,
    hotExtents: [0],
    ...options,
  })
  p.peerConnected()
  return p
}

void t.test('primary: overlapping writes wait in arrival order, disjoint ones run', (t) => {
  const p = hotPrimary()
  t.same(show(p.clientWrite(w(1, 0, 8 * KiB))), [
    'writeLocal r1 write@0+8192',
    'sendToPeer e7 s1 r1 write@0+8192',
  ])
  t.same(show(p.clientWrite(w(2, 4 * KiB, 8 * KiB))), [], 'r2 overlaps r1: waits')
  t.same(show(p.clientWrite(w(3, 64 * KiB, 4 * KiB))), [
    'writeLocal r3 write@65536+4096',
    'sendToPeer e7 s2 r3 write@65536+4096',
  ])
  t.same(show(p.clientWrite(w(4, 10 * KiB, 1 * KiB))), [], 'r4 overlaps the waiting r2')
  t.same(show(p.localDone({ requestId: 1, ok: true })), [], 'peer ack still missing: no reply')
  t.same(show(p.peerAck({ epoch: 7, seq: 1 })), [
    'reply r1 ok',
    'writeLocal r2 write@4096+8192',
    'sendToPeer e7 s3 r2 write@4096+8192',
  ])
  t.same(show(p.peerAck({ epoch: 7, seq: 3 })), [], 'peer first, local pending: no reply')
  t.same(show(p.localDone({ requestId: 2, ok: true })), [
    'reply r2 ok',
    'writeLocal r4 write@10240+1024',
    'sendToPeer e7 s4 r4 write@10240+1024',
  ])
  t.equal(p.inflightOps, 2)
  t.end()
})

void t.test('primary: FUA travels to both sides; the reply still needs both', (t) => {
  const p = hotPrimary()
  t.same(show(p.clientWrite(w(1, 0, 4096, true))), [
    'writeLocal r1 write@0+4096 fua',
    'sendToPeer e7 s1 r1 write@0+4096 fua',
  ])
  t.same(
    show(p.clientWrite({ requestId: 2, offset: 8192, length: 4096, fua: true, kind: 'trim' })),
    ['writeLocal r2 trim@8192+4096 fua', 'sendToPeer e7 s2 r2 trim@8192+4096 fua'],
  )
  t.same(show(p.localDone({ requestId: 1, ok: true })), [])
  t.same(show(p.peerAck({ epoch: 7, seq: 1 })), ['reply r1 ok'])
  t.end()
})

void t.test('primary: flush covers completed writes only, on both sides', (t) => {
  const p = hotPrimary({ hotExtents: [] })
  const seq = heat(p, 7, [0], 1024 * KiB)
  p.clientWrite(w(1, 0, 4096))
  p.localDone({ requestId: 1, ok: true })
  p.peerAck({ epoch: 7, seq })
  p.clientWrite(w(2, 2 * 1024 * KiB, 4096)) // extent 2: cold
  t.same(
    show(p.clientFlush({ requestId: 3 })),
    ['flushLocal f1', 'sendFlushToPeer e7 f1'],
    'the flush does not wait for r2, which is still in flight',
  )
  t.same(p.coolable(), [], 'extent 0 holds a completed write not yet flushed')
  t.same(show(p.localFlushDone({ flushId: 1, ok: true })), [], 'the peer has not synced yet')
  t.same(show(p.peerFlushAck({ epoch: 7, flushId: 1 })), ['reply r3 ok'])
  t.same(p.coolable(), [0], 'flushed on both sides: extent 0 may cool')
  t.same(show(p.peerFlushAck({ epoch: 7, flushId: 1 })), [], 'a second ack is ignored')
  t.equal(p.counters.unknownAcks, 1)
  t.same(show(p.clientFlush({ requestId: 4 })), ['flushLocal f2', 'sendFlushToPeer e7 f2'])
  t.same(show(p.localFlushDone({ flushId: 2, ok: false })), [])
  t.same(show(p.peerFlushAck({ epoch: 7, flushId: 2 })), ['reply r4 IO_ERROR'])
  t.end()
})

void t.test('primary: activity log groups cold extents, hot ones stay hot, cooling', (t) => {
  const p = new PrimaryReplication({ epoch: 1, extentBytes: 64 * KiB })
  p.peerConnected()
  t.same(show(p.clientWrite(w(1, 0, 4096))), ['persistActivityLog hot=[0] cold=[]'])
  t.same(show(p.clientWrite(w(2, 8192, 4096))), [], 'extent 0 is being persisted: wait')
  t.same(show(p.clientWrite(w(3, 64 * KiB, 4096))), [], 'one transaction at a time: queued')
  t.same(show(p.clientWrite(w(4, 127 * KiB, 2 * KiB))), [], 'spans extents 1 and 2')
  t.same(
    show(p.activityLogPersisted({ extents: [0], coldExtents: [] })),
    [
      'writeLocal r1 write@0+4096',
      'sendToPeer e1 s1 r1 write@0+4096',
      'writeLocal r2 write@8192+4096',
      'sendToPeer e1 s2 r2 write@8192+4096',
      'persistActivityLog hot=[1,2] cold=[]',
    ],
    'the waiting writes share one transaction',
  )
  t.same(show(p.activityLogPersisted({ extents: [1, 2], coldExtents: [] })), [
    'writeLocal r3 write@65536+4096',
    'sendToPeer e1 s3 r3 write@65536+4096',
    'writeLocal r4 write@130048+2048',
    'sendToPeer e1 s4 r4 write@130048+2048',
  ])
  for (const [r, s] of [
    [1, 1],
    [2, 2],
    [3, 3],
    [4, 4],
  ] as const) {
    p.localDone({ requestId: r, ok: true })
    p.peerAck({ epoch: 1, seq: s })
  }
  t.same(
    show(p.clientWrite(w(5, 0, 4096, true))),
    ['writeLocal r5 write@0+4096 fua', 'sendToPeer e1 s5 r5 write@0+4096 fua'],
    'hot stays hot',
  )
  t.same(p.coolable(), [], 'nothing flushed yet; extent 0 is busy')
  p.localDone({ requestId: 5, ok: true })
  p.peerAck({ epoch: 1, seq: 5 })
  p.clientFlush({ requestId: 6 })
  p.localFlushDone({ flushId: 1, ok: true })
  p.peerFlushAck({ epoch: 1, flushId: 1 })
  t.same(p.coolable(), [0, 1, 2])
  t.same(show(p.coolExtents({ extents: [0, 1] })), ['persistActivityLog hot=[] cold=[0,1]'])
  t.same(show(p.clientWrite(w(7, 0, 4096))), [], 'extent 0 is cooling: wait, then re-heat')
  t.same(p.hotExtents(), [0, 1, 2], 'cooling extents are still durably hot')
  t.same(show(p.activityLogPersisted({ extents: [], coldExtents: [0, 1] })), [
    'persistActivityLog hot=[0] cold=[]',
  ])
  t.same(p.hotExtents(), [2])
  t.same(show(p.activityLogPersisted({ extents: [0], coldExtents: [] })), [
    'writeLocal r7 write@0+4096',
    'sendToPeer e1 s6 r7 write@0+4096',
  ])
  t.same(show(p.coolExtents({ extents: [2] })), ['persistActivityLog hot=[] cold=[2]'])
  t.throws(() => p.coolExtents({ extents: [0] }), 'extent 0 is busy: not coolable')
  t.end()
})

void t.test('primary: extents loaded hot at start stay pinned until resync', (t) => {
  // After a crash the persisted hot set is the record of where the replicas may differ: the
  // simulation showed that cooling it before a resync loses exactly that record.
  const p = new PrimaryReplication({ epoch: 3, extentBytes: 64 * KiB, hotExtents: [4, 9] })
  p.peerConnected()
  t.same(p.pinnedExtents(), [4, 9])
  t.same(p.coolable(), [], 'nothing loaded is coolable')
  t.throws(() => p.coolExtents({ extents: [4] }), 'cooling a pinned extent is a programmer error')
  t.end()
})

void t.test('primary: a pending cool is cancelled by a new write', (t) => {
  const p = new PrimaryReplication({ epoch: 1, extentBytes: 64 * KiB })
  p.peerConnected()
  const seq = heat(p, 1, [0, 1], 64 * KiB)
  p.clientWrite(w(1, 0, 4096, true))
  p.localDone({ requestId: 1, ok: true })
  p.peerAck({ epoch: 1, seq })
  t.same(show(p.coolExtents({ extents: [0] })), ['persistActivityLog hot=[] cold=[0]'])
  t.same(show(p.coolExtents({ extents: [1] })), [], 'waits for the transaction in flight')
  t.same(
    show(p.clientWrite(w(2, 64 * KiB, 4096))),
    ['writeLocal r2 write@65536+4096', `sendToPeer e1 s${seq + 1} r2 write@65536+4096`],
    'extent 1 was only about to cool: it stays hot',
  )
  t.same(show(p.activityLogPersisted({ extents: [], coldExtents: [0] })), [], 'no cold=[1]')
  t.end()
})

void t.test('primary: disconnect keeps writes pending; reconnect re-sends in seq order', (t) => {
  const p = hotPrimary()
  p.clientWrite(w(1, 0, 4096))
  p.clientWrite(w(2, 8192, 4096))
  p.clientFlush({ requestId: 3 })
  p.localDone({ requestId: 1, ok: true })
  p.localDone({ requestId: 2, ok: true })
  p.localFlushDone({ flushId: 1, ok: true })
  t.same(show(p.peerDisconnected()), [])
  t.same(show(p.clientWrite(w(4, 16384, 4096))), ['writeLocal r4 write@16384+4096'], 'no send')
  t.same(show(p.localDone({ requestId: 4, ok: true })), [], 'never acknowledged alone')
  t.same(show(p.peerAck({ epoch: 7, seq: 2 })), ['reply r2 ok'], 'a late ack is still genuine')
  t.same(show(p.peerConnected()), [
    'sendToPeer e7 s1 r1 write@0+4096',
    'sendToPeer e7 s3 r4 write@16384+4096',
    'sendFlushToPeer e7 f1',
  ])
  t.same(show(p.peerAck({ epoch: 7, seq: 3 })), ['reply r4 ok'])
  t.same(show(p.peerAck({ epoch: 7, seq: 1 })), ['reply r1 ok'])
  t.same(show(p.peerFlushAck({ epoch: 7, flushId: 1 })), ['reply r3 ok'])
  t.equal(p.degraded, false)
  t.end()
})

void t.test('primary, degraded: no peer, writes complete locally and are marked dirty', (t) => {
  const p = new PrimaryReplication({
    epoch: 9,
    extentBytes: 1024 * KiB,
    hotExtents: [0],
    degraded: true,
  })
  t.same(show(p.clientWrite(w(1, 0, 4096))), ['markDirty 0+4096', 'writeLocal r1 write@0+4096'])
  t.same(show(p.clientWrite(w(2, 2048, 4096))), [], 'overlaps still wait their turn')
  t.same(show(p.localDone({ requestId: 1, ok: true })), [
    'reply r1 ok',
    'markDirty 2048+4096',
    'writeLocal r2 write@2048+4096',
  ])
  t.same(show(p.clientFlush({ requestId: 3 })), ['flushLocal f1'], 'a flush is local only')
  t.same(show(p.localFlushDone({ flushId: 1, ok: true })), ['reply r3 ok'])
  t.same(show(p.localDone({ requestId: 2, ok: false })), ['reply r2 IO_ERROR'])
  t.same(
    show(p.clientWrite(w(4, 2048 * KiB, 4096))),
    ['persistActivityLog hot=[2] cold=[]'],
    'the activity log still runs',
  )
  t.same(show(p.activityLogPersisted({ extents: [2], coldExtents: [] })), [
    'markDirty 2097152+4096',
    'writeLocal r4 write@2097152+4096',
  ])
  t.throws(() => p.peerConnected(), /no peer stream/)
  t.end()
})

void t.test('primary: stale and unknown acks are ignored and counted', (t) => {
  const p = hotPrimary()
  p.clientWrite(w(1, 0, 4096))
  p.localDone({ requestId: 1, ok: true })
  t.same(show(p.peerAck({ epoch: 6, seq: 1 })), [], 'older epoch')
  t.same(show(p.peerAck({ epoch: 8, seq: 1 })), [], 'another epoch')
  t.same(show(p.peerAck({ epoch: 7, seq: 9 })), [], 'never issued')
  t.same(show(p.peerError({ epoch: 6, seq: 1, code: 'IO_ERROR' })), [])
  t.same(show(p.peerAck({ epoch: 7, seq: 1 })), ['reply r1 ok'])
  t.same(show(p.peerAck({ epoch: 7, seq: 1 })), [], 'acked already')
  t.same(p.counters, { staleAcks: 3, unknownAcks: 2, checksumRetries: 0, peerResets: 0 })
  t.end()
})

void t.test('primary: back-pressure through canAdmit, by ops and by payload bytes', (t) => {
  const p = hotPrimary({ inflightOpsMax: 3, inflightBytesMax: 16 * KiB })
  t.ok(p.canAdmit({ kind: 'write', length: 64 * KiB }), 'nothing in flight: any size')
  p.clientWrite(w(1, 0, 12 * KiB))
  t.notOk(p.canAdmit({ kind: 'write', length: 8 * KiB }), 'over inflightBytesMax')
  t.ok(p.canAdmit({ kind: 'trim', length: 1024 * KiB }), 'a trim carries no payload')
  p.clientWrite({ requestId: 2, offset: 0, length: 4096, fua: false, kind: 'zero' })
  p.clientFlush({ requestId: 3 })
  t.notOk(p.canAdmit({ kind: 'flush', length: 0 }), 'inflightOpsMax reached')
  t.throws(() => p.clientWrite(w(4, 0, 1)), 'ignoring canAdmit is a programmer error')
  p.localDone({ requestId: 1, ok: true })
  p.peerAck({ epoch: 7, seq: 1 })
  t.ok(p.canAdmit({ kind: 'write', length: 16 * KiB }))
  t.equal(p.inflightBytes, 0)
  t.end()
})

void t.test('primary: seq window holds issue until the oldest unacked seq is acked', (t) => {
  const p = hotPrimary({ seqWindowMax: 2 })
  p.clientWrite(w(1, 0, 4096))
  p.clientWrite(w(2, 8192, 4096))
  t.same(show(p.clientWrite(w(3, 16384, 4096))), [], 's3 would be outside [s1, s1+2)')
  p.localDone({ requestId: 2, ok: true })
  t.same(show(p.peerAck({ epoch: 7, seq: 2 })), ['reply r2 ok'], 's1 still unacked')
  t.same(show(p.peerAck({ epoch: 7, seq: 1 })), [
    'writeLocal r3 write@16384+4096',
    'sendToPeer e7 s3 r3 write@16384+4096',
  ])
  t.end()
})

void t.test('primary: checksum mismatch is retried, then the link is dropped', (t) => {
  const p = hotPrimary({ peerRetriesMax: 1 })
  p.clientWrite(w(1, 0, 4096))
  p.localDone({ requestId: 1, ok: true })
  t.same(show(p.peerError({ epoch: 7, seq: 1, code: 'CHECKSUM_MISMATCH' })), [
    'sendToPeer e7 s1 r1 write@0+4096',
  ])
  t.same(
    show(p.peerError({ epoch: 7, seq: 1, code: 'CHECKSUM_MISMATCH' })),
    ['disconnectPeer CHECKSUM_MISMATCH'],
    'reported, not applied, not failed',
  )
  t.same(show(p.peerConnected()), ['sendToPeer e7 s1 r1 write@0+4096'])
  t.same(show(p.peerAck({ epoch: 7, seq: 1 })), ['reply r1 ok'])
  t.same(p.counters, { staleAcks: 0, unknownAcks: 0, checksumRetries: 1, peerResets: 1 })
  t.end()
})

void t.test('primary: failures fail the request and pin its extents', (t) => {
  const p = hotPrimary()
  p.clientWrite(w(1, 0, 4096, true))
  p.clientWrite(w(2, 0, 4096))
  p.localDone({ requestId: 1, ok: false })
  t.same(show(p.peerAck({ epoch: 7, seq: 1 })), [
    'reply r1 IO_ERROR',
    'writeLocal r2 write@0+4096',
    'sendToPeer e7 s2 r2 write@0+4096',
  ])
  p.localDone({ requestId: 2, ok: true })
  t.same(show(p.peerError({ epoch: 7, seq: 2, code: 'IO_ERROR' })), ['reply r2 IO_ERROR'])
  t.same(p.pinnedExtents(), [0])
  p.clientFlush({ requestId: 3 })
  p.localFlushDone({ flushId: 1, ok: true })
  p.peerFlushAck({ epoch: 7, flushId: 1 })
  t.same(p.coolable(), [], 'a pinned extent never cools here: the replicas may differ')
  t.end()
})

void t.test('primary: EPOCH_STALE from the peer fences: every request fails', (t) => {
  const p = hotPrimary()
  p.clientWrite(w(1, 0, 4096))
  p.clientWrite(w(2, 0, 4096)) // waits for r1's range
  p.clientWrite(w(3, 2 * 1024 * KiB, 4096)) // waits for the activity log
  p.clientFlush({ requestId: 4 })
  t.same(
    show(p.peerError({ epoch: 7, seq: 1, code: 'EPOCH_STALE' })),
    ['reply r2 EPOCH_STALE', 'reply r3 EPOCH_STALE'],
    'r1 and the flush wait for their local completions',
  )
  t.same(show(p.localDone({ requestId: 1, ok: true })), ['reply r1 EPOCH_STALE'])
  t.same(show(p.localFlushDone({ flushId: 1, ok: true })), ['reply r4 EPOCH_STALE'])
  t.same(show(p.activityLogPersisted({ extents: [2], coldExtents: [] })), [])
  t.same(show(p.clientWrite(w(5, 0, 1))), ['reply r5 EPOCH_STALE'])
  t.equal(p.fenced, 'EPOCH_STALE')
  t.equal(p.inflightOps, 0)
  t.end()
})

// ---------------------------------------------------------------------------------------------
// Secondary

const rx = (epoch: number, seq: number, offset: number, length: number, from = 'node-a1') => ({
  epoch,
  seq,
  from,
  offset,
  length,
  fua: false,
  kind: 'write' as const,
  checksumOk: true,
})

void t.test('secondary: rejects older epochs, newer epochs and other senders', (t) => {
  const s = new SecondaryReplication({ epoch: 5, primary: 'node-a1' })
  t.same(show(s.receive(rx(4, 1, 0, 4096))), ['reject e4 s1 EPOCH_STALE'])
  t.same(show(s.receive(rx(6, 1, 0, 4096))), ['reject e6 s1 EPOCH_AHEAD'])
  t.same(show(s.receive(rx(5, 1, 0, 4096, 'node-x'))), ['reject e5 s1 WRONG_SENDER'])
  t.same(show(s.receive({ ...rx(5, 1, 0, 4096), checksumOk: false })), [
    'reject e5 s1 CHECKSUM_MISMATCH',
  ])
  t.same(show(s.receiveFlush({ epoch: 4, flushId: 1, from: 'node-a1' })), [
    'rejectFlush e4 f1 EPOCH_STALE',
  ])
  t.same(show(s.receive(rx(5, 1, 0, 4096))), ['writeLocal e5 s1 write@0+4096'], 'retry applies')
  t.same(s.counters.rejected, {
    EPOCH_STALE: 2,
    EPOCH_AHEAD: 1,
    WRONG_SENDER: 1,
    CHECKSUM_MISMATCH: 1,
    IO_ERROR: 0,
    SEQ_OUT_OF_WINDOW: 0,
    OUT_OF_ORDER: 0,
  })
  t.end()
})

void t.test('secondary: each seq applied at most once; duplicates re-acked or ignored', (t) => {
  const s = new SecondaryReplication({ epoch: 1, primary: 'p' })
  t.same(show(s.receive(rx(1, 1, 0, 4096, 'p'))), ['writeLocal e1 s1 write@0+4096'])
  t.same(show(s.receive(rx(1, 1, 0, 4096, 'p'))), [], 'in flight: the ack follows')
  t.same(show(s.localDone({ epoch: 1, seq: 1, ok: true })), ['ack e1 s1'])
  t.same(show(s.receive(rx(1, 1, 0, 4096, 'p'))), ['ack e1 s1'], 'applied: re-ack, no write')
  t.same([s.counters.duplicatesInflight, s.counters.duplicatesApplied], [1, 1])
  t.end()
})

void t.test('secondary: overlapping ops apply in seq order, disjoint ones in parallel', (t) => {
  const s = new SecondaryReplication({ epoch: 1, primary: 'p' })
  t.same(show(s.receive(rx(1, 1, 0, 8192, 'p'))), ['writeLocal e1 s1 write@0+8192'])
  t.same(show(s.receive(rx(1, 2, 4096, 8192, 'p'))), [], 'overlaps s1: waits')
  t.same(show(s.receive(rx(1, 3, 65536, 4096, 'p'))), ['writeLocal e1 s3 write@65536+4096'])
  t.same(show(s.receive(rx(1, 4, 0, 1, 'p'))), [], 'overlaps s1: waits behind it')
  t.same(show(s.receive(rx(1, 1, 0, 8192, 'p'))), [], 'duplicate of the in-flight s1')
  t.same(show(s.localDone({ epoch: 1, seq: 1, ok: true })), [
    'ack e1 s1',
    'writeLocal e1 s2 write@4096+8192',
    'writeLocal e1 s4 write@0+1',
  ])
  t.same(show(s.receive(rx(1, 5, 100, 10000, 'p'))), [], 'overlaps the running s2')
  t.same(show(s.localDone({ epoch: 1, seq: 2, ok: true })), [
    'ack e1 s2',
    'writeLocal e1 s5 write@100+10000',
  ])
  t.end()
})

void t.test('secondary: a lower seq may not overtake an admitted overlapping one', (t) => {
  const s = new SecondaryReplication({ epoch: 1, primary: 'p' })
  s.receive(rx(1, 3, 0, 4096, 'p'))
  t.same(show(s.receive(rx(1, 2, 2048, 4096, 'p'))), ['reject e1 s2 OUT_OF_ORDER'])
  t.same(show(s.receive(rx(1, 1, 8192, 4096, 'p'))), ['writeLocal e1 s1 write@8192+4096'])
  t.end()
})

void t.test('secondary: applied-seq memory is a watermark plus a bounded set', (t) => {
  const s = new SecondaryReplication({ epoch: 1, primary: 'p', seqWindowMax: 4 })
  s.receive(rx(1, 1, 0, 10, 'p'))
  for (const seq of [2, 3, 4]) {
    s.receive(rx(1, seq, seq * 100, 10, 'p'))
    s.localDone({ epoch: 1, seq, ok: true })
  }
  t.equal(s.appliedWatermark, 0)
  t.equal(s.appliedAboveCount, 3)
  t.same(show(s.receive(rx(1, 5, 500, 10, 'p'))), ['reject e1 s5 SEQ_OUT_OF_WINDOW'])
  s.localDone({ epoch: 1, seq: 1, ok: true })
  t.equal(s.appliedWatermark, 4)
  t.equal(s.appliedAboveCount, 0, 'the set empties as the watermark passes')
  t.same(show(s.receive(rx(1, 3, 300, 10, 'p'))), ['ack e1 s3'], 'below the watermark: re-ack')
  t.same(show(s.receive(rx(1, 5, 500, 10, 'p'))), ['writeLocal e1 s5 write@500+10'])
  t.end()
})

void t.test('secondary: epoch change restarts seqs; old writes keep their ranges', (t) => {
  const s = new SecondaryReplication({ epoch: 1, primary: 'a' })
  s.receive(rx(1, 1, 0, 4096, 'a'))
  t.same(show(s.epochChanged({ epoch: 2, primary: 'b' })), [])
  t.throws(() => s.epochChanged({ epoch: 1, primary: 'a' }), 'epochs only grow')
  t.same(show(s.receive(rx(1, 2, 0, 4096, 'a'))), ['reject e1 s2 EPOCH_STALE'])
  t.same(show(s.receive(rx(2, 1, 0, 4096, 'b'))), [], 'waits for the epoch-1 write')
  t.same(show(s.localDone({ epoch: 1, seq: 1, ok: true })), ['writeLocal e2 s1 write@0+4096'])
  t.equal(s.counters.retiredCompletions, 1, 'no ack for an older epoch')
  t.end()
})

void t.test('secondary: a failed disk rejects everything new; flushes', (t) => {
  const s = new SecondaryReplication({ epoch: 1, primary: 'p' })
  t.same(show(s.receiveFlush({ epoch: 1, flushId: 1, from: 'p' })), ['flushLocal e1 f1'])
  t.same(show(s.receiveFlush({ epoch: 1, flushId: 1, from: 'p' })), [], 'in flight')
  t.same(show(s.localFlushDone({ epoch: 1, flushId: 1, ok: true })), ['flushAck e1 f1'])
  s.receive(rx(1, 1, 0, 4096, 'p'))
  t.same(show(s.localDone({ epoch: 1, seq: 1, ok: false })), ['reject e1 s1 IO_ERROR'])
  t.same(show(s.receive(rx(1, 2, 8192, 4096, 'p'))), ['reject e1 s2 IO_ERROR'])
  t.same(show(s.receiveFlush({ epoch: 1, flushId: 2, from: 'p' })), ['rejectFlush e1 f2 IO_ERROR'])
  t.ok(s.isDiskFailed)
  t.end()
})

// ---------------------------------------------------------------------------------------------
// Seeded simulation: a primary and a secondary wired by an in-test scheduler over in-memory disks.

interface Sim {
  violations: string[]
  steps: number
  stats: Record<string, number>
}

type PeerMessage =
  | { type: 'op'; epoch: number; seq: number; requestId: number; op: BlockOp }
  | { type: 'flush'; epoch: number; flushId: number }

function simulate(prng: Prng, requestsMax: number): Sim {
  const sizeBytes = 256 * KiB
  const primary = new PrimaryReplication({
    epoch: 3,
    extentBytes: 16 * KiB,
    inflightOpsMax: 1 + prng.int(24),
    inflightBytesMax: 64 * KiB,
    seqWindowMax: 2 + prng.int(16),
    peerRetriesMax: prng.int(3),
  })
  const secondary = new SecondaryReplication({
    epoch: 3,
    primary: 'a',
    seqWindowMax: primary.seqWindowMax,
  })
  const disks = { p: new Uint8Array(sizeBytes), s: new Uint8Array(sizeBytes) }
  const logs = { p: [] as number[], s: [] as number[] }
  const done = { p: new Set<number>(), s: new Set<number>() }
  const flushed = { p: new Set<number>(), s: new Set<number>() }
  const ops = new Map<number, BlockOp>()
  const flushIdOf = new Map<number, number>()
  const requestOfSeq = new Map<number, number>()
  const replies = new Map<number, boolean>()
  const corrupted = new Set<number>()
  const violations: string[] = []
  const tasks: (() => void)[] = []
  let toSecondary: PeerMessage[] = []
  let toPrimary: SecondaryEffect[] = []
  const link = { up: false }
  let nextRequest = 1
  let steps = 0
  let disconnects = 0
  let cools = 0

  const apply = (side: 'p' | 's', requestId: number) => {
    const o = ops.get(requestId)
    if (o === undefined) throw new Error(`no op ${requestId}`)
    const disk = disks[side]
    for (let i = 0; i < o.length; i++) {
      disk[o.offset + i] = o.kind === 'write' ? ((requestId * 131 + i) % 255) + 1 : 0
    }
    logs[side].push(requestId)
    done[side].add(requestId)
  }

  const onPrimary = (effects: PrimaryEffect[]): void => {
    for (const e of effects) {
      switch (e.type) {
        case 'persistActivityLog': {
          const tx = { extents: e.extents, coldExtents: e.coldExtents }
          tasks.push(() => {
            onPrimary(primary.activityLogPersisted(tx))
          })
          break
        }
        case 'writeLocal':
          tasks.push(() => {
            apply('p', e.requestId)
            onPrimary(primary.localDone({ requestId: e.requestId, ok: true }))
          })
          break
        case 'sendToPeer': {
          if (!link.up) violations.push(`sendToPeer s${e.seq} while disconnected`)
          const known = requestOfSeq.get(e.seq)
          if (known !== undefined && known !== e.requestId) violations.push(`seq ${e.seq} reused`)
          requestOfSeq.set(e.seq, e.requestId)
          const { offset, length, fua, kind } = e
          toSecondary.push({
            type: 'op',
            epoch: e.epoch,
            seq: e.seq,
            requestId: e.requestId,
            op: { offset, length, fua, kind },
          })
          break
        }
        case 'flushLocal':
          tasks.push(() => {
            flushed.p.add(e.flushId)
            onPrimary(primary.localFlushDone({ flushId: e.flushId, ok: true }))
          })
          break
        case 'sendFlushToPeer':
          toSecondary.push({ type: 'flush', epoch: e.epoch, flushId: e.flushId })
          break
        case 'disconnectPeer':
          dropLink()
          break
        case 'reply': {
          const id = e.requestId
          if (replies.has(id)) violations.push(`r${id} replied twice`)
          replies.set(id, e.ok)
          if (!e.ok) violations.push(`r${id} failed: ${e.code}`)
          const flushId = flushIdOf.get(id)
          if (flushId !== undefined) {
            if (!flushed.p.has(flushId) || !flushed.s.has(flushId)) {
              violations.push(`flush r${id} replied before both sides synced`)
            }
          } else if (!done.p.has(id) || !done.s.has(id)) {
            violations.push(`r${id} replied before both sides wrote it`)
          }
          break
        }
      }
    }
  }

  const onSecondary = (effects: SecondaryEffect[]): void => {
    for (const e of effects) {
      switch (e.type) {
        case 'writeLocal':
          tasks.push(() => {
            const id = requestOfSeq.get(e.seq)
            if (id === undefined) throw new Error(`no request for seq ${e.seq}`)
            if (done.s.has(id)) violations.push(`s${e.seq} applied twice on the secondary`)
            apply('s', id)
            onSecondary(secondary.localDone({ epoch: e.epoch, seq: e.seq, ok: true }))
          })
          break
        case 'flushLocal':
          tasks.push(() => {
            flushed.s.add(e.flushId)
            onSecondary(secondary.localFlushDone({ epoch: e.epoch, flushId: e.flushId, ok: true }))
          })
          break
        default:
          if (link.up) toPrimary.push(e) // a dropped link loses the answer
      }
    }
  }

  const dropLink = () => {
    link.up = false
    toSecondary = []
    toPrimary = []
  }

  const deliverToSecondary = () => {
    const m = toSecondary.shift()
    if (m === undefined) return
    if (m.type === 'flush') {
      onSecondary(secondary.receiveFlush({ epoch: m.epoch, flushId: m.flushId, from: 'a' }))
      return
    }
    // Corrupt at most one transmission per seq, so a retry always gets through.
    const corrupt = !corrupted.has(m.seq) && prng.bool(0.03)
    if (corrupt) corrupted.add(m.seq)
    onSecondary(
      secondary.receive({ epoch: m.epoch, seq: m.seq, from: 'a', ...m.op, checksumOk: !corrupt }),
    )
  }

  const deliverToPrimary = () => {
    const m = toPrimary.shift()
    if (m === undefined) return
    switch (m.type) {
      case 'ack':
        onPrimary(primary.peerAck(m))
        break
      case 'reject':
        onPrimary(primary.peerError(m))
        break
      case 'flushAck':
        onPrimary(primary.peerFlushAck(m))
        break
      case 'rejectFlush':
        onPrimary(primary.peerFlushError(m))
        break
      default:
        throw new Error(`not a message: ${m.type}`)
    }
  }

  const clientRequest = () => {
    const requestId = nextRequest++
    const roll = prng.next()
    if (roll < 0.15) {
      if (!primary.canAdmit({ kind: 'flush', length: 0 })) return
      const effects = primary.clientFlush({ requestId })
      const first = effects[0]
      if (first?.type !== 'flushLocal') throw new Error('a flush starts with flushLocal')
      flushIdOf.set(requestId, first.flushId)
      onPrimary(effects)
      return
    }
    const kind = roll < 0.75 ? 'write' : roll < 0.88 ? 'trim' : 'zero'
    const length = 512 * (1 + prng.int(64))
    const offset = 512 * prng.int((sizeBytes - length) / 512 + 1)
    const o: BlockOp = { offset, length, fua: prng.bool(0.2), kind }
    if (!primary.canAdmit(o)) return
    ops.set(requestId, o)
    onPrimary(primary.clientWrite({ requestId, ...o }))
  }

  onPrimary(primary.peerConnected())
  link.up = true
  // Read through a call: the closures above change `link.up` behind the compiler's back.
  const isUp = (): boolean => link.up
  let issued = 0
  for (;;) {
    steps += 1
    const busy = tasks.length + toSecondary.length + toPrimary.length
    const clientsLeft = issued < requestsMax
    if (!clientsLeft && busy === 0) {
      if (isUp()) break
      link.up = true
      onPrimary(primary.peerConnected())
      continue
    }
    const roll = prng.next()
    if (clientsLeft && (busy === 0 || roll < 0.25)) {
      issued += 1
      clientRequest()
    } else if (roll < 0.27) {
      if (isUp() && prng.bool(0.3)) {
        disconnects += 1
        dropLink()
        onPrimary(primary.peerDisconnected())
      } else if (!isUp()) {
        link.up = true
        onPrimary(primary.peerConnected())
      }
    } else if (roll < 0.28) {
      const coolable = primary.coolable()
      if (coolable.length > 0) {
        cools += 1
        onPrimary(primary.coolExtents({ extents: coolable }))
      }
    } else if (roll < 0.5 && toSecondary.length > 0) {
      deliverToSecondary()
    } else if (roll < 0.65 && toPrimary.length > 0) {
      deliverToPrimary()
    } else if (tasks.length > 0) {
      const index = prng.int(tasks.length)
      const task = tasks[index]
      tasks.splice(index, 1)
      task?.()
    }
    if (steps > 1_000_000) {
      violations.push('no quiescence after 1e6 steps')
      break
    }
  }

  // After quiescence.
  if (primary.inflightOps !== 0) violations.push(`${primary.inflightOps} requests never replied`)
  const asked = ops.size + flushIdOf.size
  if (replies.size !== asked) violations.push(`${asked - replies.size} requests without reply`)
  for (let i = 0; i < sizeBytes; i++) {
    if (disks.p[i] !== disks.s[i]) {
      violations.push(`disks differ at byte ${i}`)
      break
    }
  }
  for (const id of ops.keys()) {
    for (const side of ['p', 's'] as const) {
      const count = logs[side].filter((x) => x === id).length
      if (replies.get(id) === true && count !== 1) violations.push(`r${id} on ${side} ${count}x`)
    }
  }
  const position = { p: new Map<number, number>(), s: new Map<number, number>() }
  for (const side of ['p', 's'] as const) logs[side].forEach((id, i) => position[side].set(id, i))
  const list = [...ops]
  for (let i = 0; i < list.length; i++) {
    for (let j = i + 1; j < list.length; j++) {
      const [a, oa] = list[i] ?? [0, undefined]
      const [b, ob] = list[j] ?? [0, undefined]
      if (oa === undefined || ob === undefined) continue
      if (!(oa.offset < ob.offset + ob.length && ob.offset < oa.offset + oa.length)) continue
      const pa = position.p.get(a) ?? -1
      const pb = position.p.get(b) ?? -1
      const sa = position.s.get(a) ?? -1
      const sb = position.s.get(b) ?? -1
      if (pa < pb !== sa < sb) violations.push(`overlapping r${a} and r${b} applied in two orders`)
      if (pa > pb) violations.push(`overlapping r${b} overtook the earlier r${a}`)
    }
  }
  const stats = {
    disconnects,
    peerResets: primary.counters.peerResets,
    checksumRetries: primary.counters.checksumRetries,
    duplicatesApplied: secondary.counters.duplicatesApplied,
    duplicatesInflight: secondary.counters.duplicatesInflight,
    checksumRejects: secondary.counters.rejected.CHECKSUM_MISMATCH,
    unknownAcks: primary.counters.unknownAcks,
    activityLogCools: cools,
  }
  return { violations, steps, stats }
}

void t.test('simulation: random delivery and disconnects keep both replicas identical', (t) => {
  const seed = testSeed()
  t.comment(`seed ${seed} (DUPLEX_SEED=${seed} replays)`)
  const prng = new Prng(seed)
  let steps = 0
  const totals: Record<string, number> = {}
  for (let run = 0; run < 60; run++) {
    let result: Sim
    try {
      result = simulate(prng, 150 + prng.int(150))
    } catch (error) {
      t.fail(`seed ${seed} run ${run}: ${String(error)}`)
      break
    }
    steps += result.steps
    for (const [name, n] of Object.entries(result.stats)) totals[name] = (totals[name] ?? 0) + n
    if (result.violations.length > 0) {
      t.fail(`seed ${seed} run ${run}: ${result.violations.slice(0, 5).join('; ')}`)
      break
    }
  }
  t.comment(`${steps} steps; ${JSON.stringify(totals)}`)
  t.ok(steps > 10_000, 'thousands of steps')
  for (const [name, n] of Object.entries(totals)) t.ok(n > 0, `the runs exercised ${name}`)
  t.end()
})
