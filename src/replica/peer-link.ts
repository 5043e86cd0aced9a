/**
 * The replication transport: one gRPC bidirectional stream per volume pair (service
 * duplex.v1.Replication), opened by the primary's node (`PeerLinkClient`) to the secondary's node
 * (`PeerLinkServer`). It moves the replication core's effects (`sendToPeer`, `sendFlushToPeer`,
 * `ack`, `flushAck`, `reject`, `rejectFlush`) and knows nothing of volumes: the driver decides
 * what a Hello means and what to do with each op.
 *
 * Stream states: `hello` (the client sent Hello, waits for HelloAck/HelloReject) -> `open` ->
 * `closed` (once, with a `LinkClosed` reason reported to the handler exactly once).
 *
 * - Batching: ops sent in one event-loop turn leave as one OpBatch (flushed from `setImmediate`),
 *   split so that a batch never exceeds `batchBytesMax` payload bytes or `batchOpsMax` ops (a
 *   single larger op goes alone). Acks produced in one turn leave as one AckBatch. Any other
 *   message first flushes the pending batch, so the order of messages is the order of calls.
 * - Checksums: the client computes each write's xxh64 over the caller's data; the server checks
 *   it against the received bytes and reports `checksumOk` (never throws on a mismatch).
 * - Bounds: the client counts payload bytes sent and not yet acked or rejected; `sendOp` past
 *   `inflightBytesMax` is a programmer error (ask `canSend(length)` first). `canSend` is also
 *   false while gRPC's write buffer is full; `onDrained` fires when it becomes true again.
 * - Failures: bytes a peer sends are decoded at the edge; garbage ends the stream with a Goodbye
 *   PROTOCOL_ERROR and a typed close reason, never an exception. Keepalive pings notice a
 *   silent peer within about `keepaliveTimeMs + keepaliveTimeoutMs`.
 */
import { randomBytes } from 'node:crypto'
import * as grpc from '@grpc/grpc-js'
import { clusterChannelOptions, identityOfSubject, identityProblem } from '../core/tls.js'
import type { Identity } from '../core/tls.js'
import { EventEmitter } from 'node:events'
import type * as http2 from 'node:http2'
import { assert, assertSafeUint } from '../core/assert.js'
import { decodeRequest, decodeResponse, encodeRequest, encodeResponse } from './peer-messages.js'
import { batchAcksMax, batchOpsMax, protocolVersion } from './peer-messages.js'
import type {
  EpochFlush,
  GoodbyeReason,
  Hello,
  HelloAck,
  HelloReject,
  ReplicateRequest,
  ReplicateResponse,
  WireOp,
} from './peer-messages.js'
import type { BlockOp, ReplicationCode } from './replication-types.js'
import { loadXxh64 } from './xxh64.js'
import type { Xxh64 } from './xxh64.js'

const MiB = 1024 * 1024

/** Payload bytes sent and not yet acked or rejected, per stream. */
export const peerInflightBytesMaxDefault = 64 * MiB
/** Payload bytes per OpBatch (a single larger op is sent alone). */
export const peerBatchBytesMaxDefault = 8 * MiB
/** gRPC message size limit, both directions: a 32 MiB write plus framing fits. */
export const peerMessageBytesMax = 40 * MiB
/** Time to wait for HelloAck before giving up on a new stream. */
export const peerHelloTimeoutMsDefault = 5000
/** `PeerLinkServer.close()` waits this long for streams to end, then cuts them. */
export const peerCloseGraceMsDefault = 2000
/** Keepalive: ping after this much silence ... */
export const peerKeepaliveTimeMs = 1000
/** ... and drop the connection if the ping is not answered within this. */
export const peerKeepaliveTimeoutMs = 1000

const replicatePath = '/duplex.v1.Replication/Replicate'
const identity = (buffer: Buffer): Buffer => buffer

const replicationService: grpc.ServiceDefinition = {
  Replicate: {
    path: replicatePath,
    requestStream: true,
    responseStream: true,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
    originalName: 'replicate',
  },
}

const keepaliveOptions: grpc.ChannelOptions = {
  'grpc.keepalive_time_ms': peerKeepaliveTimeMs,
  'grpc.keepalive_timeout_ms': peerKeepaliveTimeoutMs,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.max_send_message_length': peerMessageBytesMax,
  'grpc.max_receive_message_length': peerMessageBytesMax,
  // The stream re-sends by itself (seqs, acks): grpc-js's retry layer only adds a buffering copy
  // of every message on the hot path. (Do not turn channelz off too: with it off, the primary
  // never noticed a forced shutdown of its peer in test/integration/replicated-volume.test.ts;
  // the cause inside grpc-js was not pinned down.)
  'grpc.enable_retries': 0,
}

// ---------------------------------------------------------------------------------------------
// Errors and close reasons

/**
 * Why a stream ended.
 * - LOCAL_CLOSE: this side closed it (`close()`, or the server shutting down).
 * - GOODBYE: the peer ended it on purpose and said why (`goodbye`).
 * - PEER_ENDED: the peer ended it without a Goodbye.
 * - PEER_UNAVAILABLE: the connection failed (peer gone, keepalive timeout, transport error).
 * - PROTOCOL_ERROR: the peer sent bytes that do not decode or break the protocol.
 */
export type LinkCloseCode =
  'LOCAL_CLOSE' | 'GOODBYE' | 'PEER_ENDED' | 'PEER_UNAVAILABLE' | 'PROTOCOL_ERROR'

export interface LinkClosed {
  code: LinkCloseCode
  /** Set when code is GOODBYE (the peer's reason) or LOCAL_CLOSE (ours). */
  goodbye?: GoodbyeReason
  message: string
}

/**
 * Why `openStream` failed.
 * - HELLO_REJECTED: the peer refused the Hello (`rejection` says why).
 * - PEER_UNAVAILABLE: no connection, or the stream failed before the HelloAck.
 * - HELLO_TIMEOUT: no answer within `helloTimeoutMs`.
 * - PROTOCOL_ERROR: the first answer was not a HelloAck or HelloReject.
 * - CLOSED: the client was closed.
 */
export type PeerLinkErrorCode =
  'HELLO_REJECTED' | 'PEER_UNAVAILABLE' | 'HELLO_TIMEOUT' | 'PROTOCOL_ERROR' | 'CLOSED'

export class PeerLinkError extends Error {
  override name = 'PeerLinkError'
  constructor(
    readonly code: PeerLinkErrorCode,
    message: string,
    readonly rejection?: HelloReject,
  ) {
    super(message)
  }
}

function describeStatus(error: unknown): string {
  if (typeof error === 'object' && error !== null && 'code' in error && 'details' in error) {
    const { code, details } = error
    const name = typeof code === 'number' ? grpc.status[code] : undefined
    return `${name ?? String(code)}: ${String(details)}`
  }
  return error instanceof Error ? error.message : String(error)
}

// ---------------------------------------------------------------------------------------------
// Server

/** An op as the secondary's driver sees it: the wire op plus the result of its checksum. */
export interface ReceivedOp extends WireOp {
  /** xxh64 of the received data matched (always true for trim and zero). */
  checksumOk: boolean
}

/** The secondary's side of an accepted stream. Calls arrive in the order the primary sent. */
export interface ServerStreamHandler {
  onOp(op: ReceivedOp): void
  onFlush(flush: EpochFlush): void
  /** Exactly once per accepted stream; nothing more is delivered after it. */
  onClosed(reason: LinkClosed): void
}

/** What the secondary's driver sends back on a stream. Calls after close are ignored. */
export interface PeerReplies {
  readonly hello: Hello
  readonly peerAddress: string
  ack(epoch: number, seq: number): void
  flushAck(epoch: number, flushId: number): void
  reject(epoch: number, seq: number, code: ReplicationCode, message: string): void
  rejectFlush(epoch: number, flushId: number, code: ReplicationCode, message: string): void
  /** Say Goodbye and end the stream (the handler's onClosed follows with LOCAL_CLOSE). */
  close(reason: GoodbyeReason, message: string): void
}

export type HelloDecision =
  | { type: 'accept'; epoch: number; appliedSeq: number; handler: ServerStreamHandler }
  | ({ type: 'reject' } & HelloReject)

export interface PeerLinkServerOptions {
  /** Decide on a new stream. `replies` is live once the decision is `accept`. */
  onStream(hello: Hello, replies: PeerReplies): HelloDecision
  /** Random per process start by default. */
  incarnation?: Buffer
  credentials?: grpc.ServerCredentials
  /**
   * `credentials` are cluster TLS (src/core/tls.ts): a Hello is refused (WRONG_SENDER) unless
   * the caller's certificate is a duplex-node certificate naming the Hello's node.
   */
  secure?: boolean
  closeGraceMs?: number
  /** Merged over the defaults (keepalive, message sizes). */
  channelOptions?: grpc.ChannelOptions
}

export interface ServerStreamStats {
  opBatchesReceived: number
  opsReceived: number
  checksumMismatches: number
  ackBatchesSent: number
  acksSent: number
}

type ServerCall = grpc.ServerDuplexStream<Buffer, Buffer>

/** One accepted (or pending) stream on the server. */
class ServerStream implements PeerReplies {
  readonly stats: ServerStreamStats = {
    opBatchesReceived: 0,
    opsReceived: 0,
    checksumMismatches: 0,
    ackBatchesSent: 0,
    acksSent: 0,
  }
  readonly peerAddress: string
  private helloReceived: Hello | undefined
  private handler: ServerStreamHandler | undefined
  private closed = false
  private pendingAcks: { epoch: number; seq: number }[] = []
  private ackFlushScheduled = false

  constructor(
    private readonly call: ServerCall,
    private readonly server: PeerLinkServer,
    private readonly xxh64: Xxh64,
  ) {
    this.peerAddress = call.getPeer()
    call.on('data', (bytes: Buffer) => {
      this.receive(bytes)
    })
    call.on('end', () => {
      if (!this.closed) this.call.end()
      this.finish({ code: 'PEER_ENDED', message: 'the primary ended the stream' })
    })
    call.on('cancelled', () => {
      this.finish({ code: 'PEER_UNAVAILABLE', message: 'the stream was cancelled' })
    })
    call.on('error', (error: unknown) => {
      this.finish({ code: 'PEER_UNAVAILABLE', message: describeStatus(error) })
    })
  }

  get isOpen(): boolean {
    return !this.closed
  }

  get hello(): Hello {
    assert(this.helloReceived !== undefined, 'no hello yet')
    return this.helloReceived
  }

  private receive(bytes: Buffer): void {
    if (this.closed) return
    const decoded = decodeRequest(bytes)
    if (!decoded.ok) {
      this.protocolError(`${decoded.error.code}: ${decoded.error.message}`)
      return
    }
    const request = decoded.value
    if (this.helloReceived === undefined) {
      if (request.type !== 'hello') this.protocolError(`expected hello, got ${request.type}`)
      else this.onHello(request.hello)
      return
    }
    this.onRequest(request)
  }

  private onHello(hello: Hello): void {
    this.helloReceived = hello
    const certificate = this.call.getAuthContext().sslPeerCertificate
    const refusal = this.server.precheck(hello, identityOfSubject(certificate?.subject))
    const decision = refusal ?? this.server.options.onStream(hello, this)
    if (decision.type === 'reject') {
      const { code, message, epoch } = decision
      this.write({ type: 'helloReject', helloReject: { code, message, epoch } })
      this.closed = true
      this.call.end()
      return
    }
    assertSafeUint(decision.appliedSeq, 'appliedSeq')
    this.handler = decision.handler
    const helloAck = {
      incarnation: this.server.incarnation,
      epoch: decision.epoch,
      appliedSeq: decision.appliedSeq,
    }
    this.write({ type: 'helloAck', helloAck })
  }

  private onRequest(request: ReplicateRequest): void {
    const handler = this.handler
    assert(handler !== undefined, 'request before hello accepted')
    switch (request.type) {
      case 'hello':
        this.protocolError('second hello on a stream')
        return
      case 'ops':
        this.stats.opBatchesReceived++
        for (const op of request.ops) {
          if (this.closed) return
          this.stats.opsReceived++
          const checksumOk = op.kind !== 'write' || this.xxh64(op.data) === op.xxh64
          if (!checksumOk) this.stats.checksumMismatches++
          handler.onOp({ ...op, checksumOk })
        }
        return
      case 'flush':
        handler.onFlush({ epoch: request.epoch, flushId: request.flushId })
        return
      case 'goodbye':
        this.call.end()
        this.finish({ code: 'GOODBYE', goodbye: request.reason, message: request.message })
        return
    }
  }

  private protocolError(message: string): void {
    this.sendGoodbye('PROTOCOL_ERROR', message)
    this.finish({ code: 'PROTOCOL_ERROR', message })
  }

  private sendGoodbye(reason: GoodbyeReason, message: string): void {
    if (this.closed) return
    this.write({ type: 'goodbye', reason, message })
    this.call.end()
  }

  /** Report the close once, to the handler if one was accepted. */
  private finish(reason: LinkClosed): void {
    this.closed = true
    this.pendingAcks = []
    this.server.forget(this)
    const handler = this.handler
    this.handler = undefined
    handler?.onClosed(reason)
  }

  private write(response: ReplicateResponse): void {
    if (response.type !== 'acks') this.flushAcks()
    // Acks are small and bounded by the primary's in-flight window; the write buffer's
    // back-pressure is not needed on this side.
    this.call.write(encodeResponse(response))
  }

  ack(epoch: number, seq: number): void {
    if (this.closed) return
    this.pendingAcks.push({ epoch, seq })
    if (this.pendingAcks.length >= batchAcksMax) this.flushAcks()
    else if (!this.ackFlushScheduled) {
      this.ackFlushScheduled = true
      setImmediate(() => {
        this.ackFlushScheduled = false
        this.flushAcks()
      })
    }
  }

  private flushAcks(): void {
    if (this.closed || this.pendingAcks.length === 0) return
    const acks = this.pendingAcks
    this.pendingAcks = []
    this.stats.ackBatchesSent++
    this.stats.acksSent += acks.length
    this.call.write(encodeResponse({ type: 'acks', acks }))
  }

  flushAck(epoch: number, flushId: number): void {
    if (!this.closed) this.write({ type: 'flushAck', epoch, flushId })
  }

  reject(epoch: number, seq: number, code: ReplicationCode, message: string): void {
    if (!this.closed) this.write({ type: 'reject', epoch, seq, code, message })
  }

  rejectFlush(epoch: number, flushId: number, code: ReplicationCode, message: string): void {
    if (!this.closed) this.write({ type: 'rejectFlush', epoch, flushId, code, message })
  }

  close(reason: GoodbyeReason, message: string): void {
    if (this.closed) return
    this.sendGoodbye(reason, message)
    this.finish({ code: 'LOCAL_CLOSE', goodbye: reason, message })
  }

  /** Cut the stream without a goodbye (forced shutdown). */
  cancel(): void {
    this.finish({ code: 'LOCAL_CLOSE', goodbye: 'SHUTTING_DOWN', message: 'forced shutdown' })
    this.call.destroy()
  }
}

/** HTTP/2 receive windows of the secondary's side, per stream and per connection. */
export const peerStreamWindowBytes = 16 * MiB
export const peerConnectionWindowBytes = 64 * MiB

/**
 * Widens the HTTP/2 receive windows of every connection the server accepts. With the protocol's
 * default 64 KiB per stream, a primary sending 1 MiB writes waits for a WINDOW_UPDATE round trip
 * through both event loops every 64 KiB, and a replicated 1 MiB sequential write ran at about
 * 90 MB/s on loopback (about 140 MB/s with these windows). grpc-js has no server option for it,
 * so this reaches into its (private) list of HTTP/2 servers; if a grpc-js upgrade removes that,
 * replication still works at the default window, and test/integration/peer-link.test.ts
 * (which checks `PeerLinkServer.windowsWidened`) fails so that somebody notices.
 */
function widenReceiveWindows(server: grpc.Server): boolean {
  const http2Servers = (server as unknown as { http2Servers?: unknown }).http2Servers
  if (!(http2Servers instanceof Map)) return false
  for (const http2Server of http2Servers.keys()) {
    if (!(http2Server instanceof EventEmitter)) continue
    http2Server.on('session', (session: http2.ServerHttp2Session) => {
      try {
        session.settings({ initialWindowSize: peerStreamWindowBytes })
        session.setLocalWindowSize(peerConnectionWindowBytes)
      } catch {
        // A session closing at once: nothing to widen.
      }
    })
  }
  return http2Servers.size > 0
}

/** The secondary's node: accepts replication streams. */
export class PeerLinkServer {
  readonly incarnation: Buffer
  private readonly server: grpc.Server
  private readonly streams = new Set<ServerStream>()
  private closing = false
  private xxh64: Xxh64 | undefined
  /** Whether `listen` could widen the HTTP/2 receive windows (see widenReceiveWindows). */
  windowsWidened = false

  constructor(readonly options: PeerLinkServerOptions) {
    this.incarnation = options.incarnation ?? randomBytes(16)
    this.server = new grpc.Server({
      ...keepaliveOptions,
      'grpc.http2.min_ping_interval_without_data_ms': peerKeepaliveTimeMs / 2,
      ...options.channelOptions,
    })
    this.server.addService(replicationService, {
      Replicate: (call: ServerCall) => {
        this.accept(call)
      },
    })
  }

  /** The underlying server, to add the node's other services before `listen`. */
  get grpcServer(): grpc.Server {
    return this.server
  }

  /** Bind and start; resolves with the bound port (pass 0 for an ephemeral one). */
  async listen(host: string, port: number): Promise<number> {
    this.xxh64 = await loadXxh64()
    const credentials = this.options.credentials ?? grpc.ServerCredentials.createInsecure()
    return new Promise((resolve, reject) => {
      this.server.bindAsync(`${host}:${port}`, credentials, (error, bound) => {
        if (error === null) {
          this.windowsWidened = widenReceiveWindows(this.server)
          resolve(bound)
        } else {
          reject(new PeerLinkError('PEER_UNAVAILABLE', `cannot listen: ${error.message}`))
        }
      })
    })
  }

  /** Streams currently open, for tests and metrics. */
  get openStreams(): readonly ServerStream[] {
    return [...this.streams]
  }

  private accept(call: ServerCall): void {
    const xxh64 = this.xxh64
    assert(xxh64 !== undefined, 'call before listen')
    this.streams.add(new ServerStream(call, this, xxh64))
  }

  /** Refusals the server makes itself, before asking the driver. */
  precheck(hello: Hello, identity: Identity | undefined): HelloDecision | undefined {
    if (this.closing) {
      return { type: 'reject', code: 'SHUTTING_DOWN', message: 'node shutting down', epoch: 0 }
    }
    const problem =
      this.options.secure === true
        ? identityProblem(identity, { role: 'node', name: hello.fromNode })
        : undefined
    if (problem !== undefined) {
      const message = `refused a stream for ${hello.volume} from ${hello.fromNode}: ${problem}`
      return { type: 'reject', code: 'WRONG_SENDER', message, epoch: 0 }
    }
    if (hello.protocolVersion !== protocolVersion) {
      const message = `protocol ${hello.protocolVersion} not spoken (this node: ${protocolVersion})`
      return { type: 'reject', code: 'PROTOCOL_VERSION', message, epoch: 0 }
    }
    return undefined
  }

  forget(stream: ServerStream): void {
    this.streams.delete(stream)
  }

  /** Say Goodbye on every stream, wait up to `closeGraceMs` for them to end, then cut them. */
  async close(): Promise<void> {
    this.closing = true
    for (const stream of [...this.streams]) stream.close('SHUTTING_DOWN', 'node shutting down')
    const graceMs = this.options.closeGraceMs ?? peerCloseGraceMsDefault
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        for (const stream of [...this.streams]) stream.cancel()
        this.server.forceShutdown()
        resolve()
      }, graceMs)
      this.server.tryShutdown(() => {
        clearTimeout(timer)
        resolve()
      })
    })
  }

  /** Cut every connection at once, without Goodbye (tests: a crashing node). */
  forceClose(): void {
    this.closing = true
    for (const stream of [...this.streams]) stream.cancel()
    this.server.forceShutdown()
  }
}

// ---------------------------------------------------------------------------------------------
// Client

/** What the primary's driver hears on a stream. */
export interface PeerStreamHandlers {
  onAck(epoch: number, seq: number): void
  onFlushAck(epoch: number, flushId: number): void
  onReject(epoch: number, seq: number, code: ReplicationCode, message: string): void
  onRejectFlush(epoch: number, flushId: number, code: ReplicationCode, message: string): void
  /** Exactly once per opened stream; nothing more is delivered after it. */
  onClosed(reason: LinkClosed): void
  /** `canSend()` became true again after being false. */
  onDrained?(): void
}

export interface PeerLinkClientOptions {
  /** Plaintext by default; cluster TLS from TlsCredentials.channelCredentials. */
  credentials?: grpc.ChannelCredentials
  /** Merged over the defaults (keepalive, message sizes, reconnect backoff). */
  channelOptions?: grpc.ChannelOptions
  inflightBytesMax?: number
  batchBytesMax?: number
  helloTimeoutMs?: number
  /** Test hook: replace a write's payload after its checksum was computed. */
  mutateOutgoing?: (op: WireOp, data: Buffer) => Buffer
}

/** An op to replicate: the core's `sendToPeer` effect without its request id. */
export interface OutgoingOp extends BlockOp {
  epoch: number
  seq: number
  /** ZERO only: allocate rather than punch a hole. */
  noHole?: boolean
}

export interface ClientStreamStats {
  opBatchesSent: number
  opsSent: number
  messageBytesSent: number
  ackBatchesReceived: number
  acksReceived: number
  /** Times `call.write` returned false (gRPC's write buffer full). */
  writeBufferFull: number
}

type ClientCall = grpc.ClientDuplexStream<Buffer, Buffer>

interface StreamLimits {
  inflightBytesMax: number
  batchBytesMax: number
  mutateOutgoing: ((op: WireOp, data: Buffer) => Buffer) | undefined
}

/** The primary's side of one open replication stream. */
export class PeerStream {
  readonly stats: ClientStreamStats = {
    opBatchesSent: 0,
    opsSent: 0,
    messageBytesSent: 0,
    ackBatchesReceived: 0,
    acksReceived: 0,
    writeBufferFull: 0,
  }
  /** The peer's answer to our Hello (its incarnation and applied watermark). */
  helloAck: HelloAck | undefined
  private state: 'hello' | 'open' | 'closed' = 'hello'
  private inflight = new Map<number, { epoch: number; bytes: number }>()
  private inflightBytesNow = 0
  private pending: WireOp[] = []
  private pendingBytes = 0
  private batchScheduled = false
  private writeBlocked = false
  private pushedBack = false
  private handlers: PeerStreamHandlers | undefined
  private helloWaiter:
    { resolve: (ack: HelloAck) => void; reject: (error: PeerLinkError) => void } | undefined

  constructor(
    private readonly call: ClientCall,
    private readonly xxh64: Xxh64,
    private readonly options: StreamLimits,
  ) {
    call.on('data', (bytes: Buffer) => {
      this.receive(bytes)
    })
    call.on('end', () => {
      if (this.state !== 'closed') this.call.end()
      this.finish({ code: 'PEER_ENDED', message: 'the secondary ended the stream' })
    })
    call.on('error', (error: unknown) => {
      this.finish({ code: 'PEER_UNAVAILABLE', message: describeStatus(error) })
    })
    call.on('drain', () => {
      this.writeBlocked = false
      this.maybeDrained()
    })
  }

  /** Resolves on HelloAck; rejects with a typed error otherwise. */
  waitForHello(handlers: PeerStreamHandlers, timeoutMs: number): Promise<HelloAck> {
    this.handlers = handlers
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.failHello(new PeerLinkError('HELLO_TIMEOUT', `no HelloAck within ${timeoutMs} ms`))
        this.call.cancel()
      }, timeoutMs)
      this.helloWaiter = {
        resolve: (ack) => {
          clearTimeout(timer)
          resolve(ack)
        },
        reject: (error) => {
          clearTimeout(timer)
          reject(error)
        },
      }
    })
  }

  get isOpen(): boolean {
    return this.state === 'open'
  }

  /** Payload bytes sent (or queued) and not yet acked or rejected. */
  get inflightBytes(): number {
    return this.inflightBytesNow
  }

  /** Whether an op of `lengthBytes` may be sent now without exceeding the bounds. */
  canSend(lengthBytes = 0): boolean {
    return this.state === 'open' && !this.writeBlocked && this.fitsInflight(lengthBytes)
  }

  private fitsInflight(lengthBytes: number): boolean {
    return (
      this.inflightBytesNow === 0 ||
      this.inflightBytesNow + lengthBytes <= this.options.inflightBytesMax
    )
  }

  /** Queue an op; it leaves with the other ops of this event-loop turn. No-op once closed. */
  sendOp(op: OutgoingOp, data: Buffer): void {
    if (this.state !== 'open') return
    const payloadBytes = op.kind === 'write' ? op.length : 0
    assert(op.kind !== 'write' || data.length === op.length, 'write data length')
    assert(this.fitsInflight(payloadBytes), 'sendOp past inflightBytesMax: check canSend()')
    const previous = this.inflight.get(op.seq)
    // Alone in flight (an iodepth-1 client): nothing to batch with, so no loop turn of waiting.
    const alone = this.inflight.size === 0 && this.pending.length === 0
    if (previous !== undefined) this.inflightBytesNow -= previous.bytes
    this.inflight.set(op.seq, { epoch: op.epoch, bytes: payloadBytes })
    this.inflightBytesNow += payloadBytes
    if (!this.fitsInflight(1)) this.pushedBack = true

    const payload = op.kind === 'write' ? data : Buffer.alloc(0)
    const wire: WireOp = {
      epoch: op.epoch,
      seq: op.seq,
      kind: op.kind,
      offset: op.offset,
      length: op.length,
      data: payload,
      xxh64: op.kind === 'write' ? this.xxh64(payload) : 0n,
      fua: op.fua,
      noHole: op.noHole ?? false,
    }
    if (this.options.mutateOutgoing !== undefined) {
      wire.data = this.options.mutateOutgoing(wire, payload)
    }
    this.enqueue(wire, payloadBytes)
    if (alone) this.flushBatch()
  }

  private enqueue(wire: WireOp, payloadBytes: number): void {
    const full =
      this.pending.length >= batchOpsMax ||
      this.pendingBytes + payloadBytes > this.options.batchBytesMax
    if (full) this.flushBatch()
    this.pending.push(wire)
    this.pendingBytes += payloadBytes
    if (this.pendingBytes >= this.options.batchBytesMax) this.flushBatch()
    else if (!this.batchScheduled) {
      this.batchScheduled = true
      setImmediate(() => {
        this.batchScheduled = false
        this.flushBatch()
      })
    }
  }

  private flushBatch(): void {
    if (this.pending.length === 0 || this.state !== 'open') return
    const ops = this.pending
    this.pending = []
    this.pendingBytes = 0
    this.stats.opBatchesSent++
    this.stats.opsSent += ops.length
    this.write({ type: 'ops', ops })
  }

  sendFlush(epoch: number, flushId: number): void {
    if (this.state !== 'open') return
    this.flushBatch()
    this.write({ type: 'flush', epoch, flushId })
  }

  /** Say Goodbye and end the stream; `onClosed` follows with LOCAL_CLOSE. */
  close(reason: GoodbyeReason, message: string): void {
    if (this.state === 'closed') return
    if (this.state === 'open') {
      this.flushBatch()
      this.write({ type: 'goodbye', reason, message })
    }
    this.call.end()
    this.finish({ code: 'LOCAL_CLOSE', goodbye: reason, message })
  }

  private write(request: ReplicateRequest): void {
    const bytes = encodeRequest(request)
    this.stats.messageBytesSent += bytes.length
    if (!this.call.write(bytes)) {
      this.stats.writeBufferFull++
      this.writeBlocked = true
      this.pushedBack = true
    }
  }

  private maybeDrained(): void {
    if (!this.pushedBack || !this.canSend(1)) return
    this.pushedBack = false
    this.handlers?.onDrained?.()
  }

  private receive(bytes: Buffer): void {
    if (this.state === 'closed') return
    const decoded = decodeResponse(bytes)
    if (!decoded.ok) {
      this.protocolError(`${decoded.error.code}: ${decoded.error.message}`)
      return
    }
    const response = decoded.value
    if (this.state === 'hello') this.onHelloAnswer(response)
    else this.onResponse(response)
  }

  private onHelloAnswer(response: ReplicateResponse): void {
    if (response.type === 'helloAck') {
      this.state = 'open'
      this.helloAck = response.helloAck
      this.helloWaiter?.resolve(response.helloAck)
      this.helloWaiter = undefined
    } else if (response.type === 'helloReject') {
      const { code, message } = response.helloReject
      const error = new PeerLinkError('HELLO_REJECTED', `${code}: ${message}`, response.helloReject)
      this.failHello(error)
      this.call.end()
    } else {
      this.protocolError(`expected helloAck, got ${response.type}`)
    }
  }

  private onResponse(response: ReplicateResponse): void {
    const handlers = this.handlers
    assert(handlers !== undefined)
    switch (response.type) {
      case 'acks':
        this.stats.ackBatchesReceived++
        this.stats.acksReceived += response.acks.length
        for (const { epoch, seq } of response.acks) {
          if (this.state !== 'open') return
          this.settle(epoch, seq)
          handlers.onAck(epoch, seq)
        }
        this.maybeDrained()
        return
      case 'reject':
        this.settle(response.epoch, response.seq)
        handlers.onReject(response.epoch, response.seq, response.code, response.message)
        this.maybeDrained()
        return
      case 'flushAck':
        handlers.onFlushAck(response.epoch, response.flushId)
        return
      case 'rejectFlush':
        handlers.onRejectFlush(response.epoch, response.flushId, response.code, response.message)
        return
      case 'goodbye':
        this.call.end()
        this.finish({ code: 'GOODBYE', goodbye: response.reason, message: response.message })
        return
      case 'helloAck':
      case 'helloReject':
        this.protocolError(`unexpected ${response.type} on an open stream`)
        return
    }
  }

  private settle(epoch: number, seq: number): void {
    const entry = this.inflight.get(seq)
    if (entry === undefined || entry.epoch !== epoch) return
    this.inflight.delete(seq)
    this.inflightBytesNow -= entry.bytes
  }

  private protocolError(message: string): void {
    if (this.state === 'open') this.write({ type: 'goodbye', reason: 'PROTOCOL_ERROR', message })
    this.call.end()
    this.failHello(new PeerLinkError('PROTOCOL_ERROR', message))
    this.finish({ code: 'PROTOCOL_ERROR', message })
  }

  private failHello(error: PeerLinkError): void {
    if (this.state !== 'hello') return
    this.state = 'closed'
    this.helloWaiter?.reject(error)
    this.helloWaiter = undefined
  }

  private finish(reason: LinkClosed): void {
    if (this.state === 'hello') {
      this.failHello(new PeerLinkError('PEER_UNAVAILABLE', reason.message))
      return
    }
    if (this.state === 'closed') return
    this.state = 'closed'
    this.pending = []
    this.inflight.clear()
    this.inflightBytesNow = 0
    this.handlers?.onClosed(reason)
  }
}

/** The primary's node: opens replication streams to one peer node. */
export class PeerLinkClient {
  private client: grpc.Client | undefined
  private readonly streams = new Set<PeerStream>()

  constructor(private readonly options: PeerLinkClientOptions = {}) {}

  /** Create the channel (connection happens lazily, with reconnect backoff). */
  connect(address: string): void {
    assert(this.client === undefined, 'connect twice')
    this.client = new grpc.Client(
      address,
      this.options.credentials ?? grpc.credentials.createInsecure(),
      {
        ...keepaliveOptions,
        'grpc.initial_reconnect_backoff_ms': 100,
        'grpc.max_reconnect_backoff_ms': 1000,
        ...(this.options.credentials === undefined ? {} : clusterChannelOptions),
        ...this.options.channelOptions,
      },
    )
  }

  /** Open a stream: resolves once the peer accepted the Hello. */
  async openStream(
    hello: Omit<Hello, 'protocolVersion'>,
    handlers: PeerStreamHandlers,
  ): Promise<PeerStream> {
    const client = this.client
    if (client === undefined) throw new PeerLinkError('CLOSED', 'client not connected')
    const xxh64 = await loadXxh64()
    const call = client.makeBidiStreamRequest(replicatePath, identity, identity)
    const stream = new PeerStream(call, xxh64, {
      inflightBytesMax: this.options.inflightBytesMax ?? peerInflightBytesMaxDefault,
      batchBytesMax: this.options.batchBytesMax ?? peerBatchBytesMaxDefault,
      mutateOutgoing: this.options.mutateOutgoing,
    })
    const helloAck = stream.waitForHello(
      {
        ...handlers,
        onClosed: (reason) => {
          this.streams.delete(stream)
          handlers.onClosed(reason)
        },
      },
      this.options.helloTimeoutMs ?? peerHelloTimeoutMsDefault,
    )
    call.write(encodeRequest({ type: 'hello', hello: { ...hello, protocolVersion } }))
    await helloAck
    this.streams.add(stream)
    return stream
  }

  /** Close every stream (Goodbye) and the channel. */
  close(): void {
    for (const stream of [...this.streams]) stream.close('SHUTTING_DOWN', 'node shutting down')
    this.client?.close()
    this.client = undefined
  }
}

/** A fresh incarnation for this process start (16 random bytes). */
export function newIncarnation(): Buffer {
  return randomBytes(16)
}
