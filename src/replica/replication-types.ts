/**
 * Events, effects and codes of the replication state machines (src/replica/replication.ts).
 * Pure data: every value here can be logged, compared in a transcript test, or sent by a driver.
 */

/** A mutation of a byte range. `write` carries a payload, which the driver attaches by id. */
export type OpKind = 'write' | 'trim' | 'zero'

export interface BlockOp {
  offset: number
  length: number
  /** Durable on both replicas before the reply: each side syncs before completing or acking. */
  fua: boolean
  kind: OpKind
}

/** Driver-chosen id of a client request (write or flush), unique among requests in flight. */
export type RequestId = number

/** A node's name, as the transport reports the sender of a message. */
export type NodeId = string

/**
 * Why a replica refused a message (secondary `reject`) or why a request failed (primary `reply`).
 * Local to replication on purpose: the driver maps them to `ErrorCode` / errno at its edge.
 * - EPOCH_STALE: the message's epoch is older than the replica's (the sender is no longer primary).
 * - EPOCH_AHEAD: newer than the replica knows; it must learn the epoch from the witness first.
 * - WRONG_SENDER: not from the node the replica knows as primary for this epoch.
 * - CHECKSUM_MISMATCH: the payload failed its xxh64 check; never applied.
 * - IO_ERROR: the replica's own disk failed the write or flush.
 * - SEQ_OUT_OF_WINDOW: seq beyond the applied watermark + `seqWindowMax` (protocol violation).
 * - OUT_OF_ORDER: overlaps an admitted op with a higher seq (protocol violation).
 */
export type ReplicationCode =
  | 'EPOCH_STALE'
  | 'EPOCH_AHEAD'
  | 'WRONG_SENDER'
  | 'CHECKSUM_MISMATCH'
  | 'IO_ERROR'
  | 'SEQ_OUT_OF_WINDOW'
  | 'OUT_OF_ORDER'

/** Every ReplicationCode, for codecs and metrics (the `satisfies` keeps it complete). */
export const replicationCodes = [
  'EPOCH_STALE',
  'EPOCH_AHEAD',
  'WRONG_SENDER',
  'CHECKSUM_MISMATCH',
  'IO_ERROR',
  'SEQ_OUT_OF_WINDOW',
  'OUT_OF_ORDER',
] as const satisfies readonly ReplicationCode[]

// ---------------------------------------------------------------------------------------------
// Primary

export interface ClientWrite extends BlockOp {
  requestId: RequestId
}

/** A persisted activity-log transaction: `extents` become hot, `coldExtents` become cold. */
export interface ActivityLogTx {
  extents: number[]
  coldExtents: number[]
}

export type PrimaryEvent =
  | ({ type: 'clientWrite' } & ClientWrite)
  | { type: 'clientFlush'; requestId: RequestId }
  | { type: 'localDone'; requestId: RequestId; ok: boolean }
  | { type: 'localFlushDone'; flushId: number; ok: boolean }
  | { type: 'peerAck'; epoch: number; seq: number }
  | { type: 'peerError'; epoch: number; seq: number; code: ReplicationCode }
  | { type: 'peerFlushAck'; epoch: number; flushId: number }
  | { type: 'peerFlushError'; epoch: number; flushId: number; code: ReplicationCode }
  | { type: 'peerDisconnected' }
  | { type: 'peerConnected' }
  | ({ type: 'activityLogPersisted' } & ActivityLogTx)
  | { type: 'coolExtents'; extents: number[] }

export type ReplyEffect =
  | { type: 'reply'; requestId: RequestId; ok: true }
  | { type: 'reply'; requestId: RequestId; ok: false; code: ReplicationCode }

export type PrimaryEffect =
  | ({ type: 'persistActivityLog' } & ActivityLogTx)
  /** Degraded only, before the range's writeLocal: the peer lacks this range (dirty bitmap). */
  | { type: 'markDirty'; offset: number; length: number }
  | ({ type: 'writeLocal'; requestId: RequestId } & BlockOp)
  | ({ type: 'sendToPeer'; epoch: number; seq: number; requestId: RequestId } & BlockOp)
  | { type: 'flushLocal'; flushId: number }
  | { type: 'sendFlushToPeer'; epoch: number; flushId: number }
  /** Drop the peer stream (a protocol-level refusal); reconnect later and call `peerConnected`. */
  | { type: 'disconnectPeer'; code: ReplicationCode }
  | ReplyEffect

export interface PrimaryCounters {
  /** Acks and errors carrying another epoch. */
  staleAcks: number
  /** Acks and errors for a seq or flush id that is not awaiting one. */
  unknownAcks: number
  /** Payloads re-sent after a CHECKSUM_MISMATCH. */
  checksumRetries: number
  /** `disconnectPeer` effects issued. */
  peerResets: number
}

// ---------------------------------------------------------------------------------------------
// Secondary

export interface ReplicatedOp extends BlockOp {
  epoch: number
  seq: number
  from: NodeId
  /** The driver checked the payload's xxh64 (always true for trim/zero, which carry none). */
  checksumOk: boolean
}

export type SecondaryEvent =
  | ({ type: 'receive' } & ReplicatedOp)
  | { type: 'localDone'; epoch: number; seq: number; ok: boolean }
  | { type: 'receiveFlush'; epoch: number; flushId: number; from: NodeId }
  | { type: 'localFlushDone'; epoch: number; flushId: number; ok: boolean }
  | { type: 'epochChanged'; epoch: number; primary: NodeId }

export type SecondaryEffect =
  | ({ type: 'writeLocal'; epoch: number; seq: number } & BlockOp)
  | { type: 'flushLocal'; epoch: number; flushId: number }
  | { type: 'ack'; epoch: number; seq: number }
  | { type: 'flushAck'; epoch: number; flushId: number }
  | { type: 'reject'; epoch: number; seq: number; code: ReplicationCode }
  | { type: 'rejectFlush'; epoch: number; flushId: number; code: ReplicationCode }

export interface SecondaryCounters {
  rejected: Record<ReplicationCode, number>
  /** Duplicates of applied seqs, re-acked without writing. */
  duplicatesApplied: number
  /** Duplicates of seqs still being written, ignored (their ack follows). */
  duplicatesInflight: number
  /** Writes of an older epoch that completed after the epoch changed (no ack sent). */
  retiredCompletions: number
}
