/**
 * The NBD server: sockets, framing and dispatch. Each connection runs the pure Handshake, then
 * reads requests, validates each once with `validateRequest`, and dispatches it to the export's
 * BlockDevice without waiting for earlier requests, so many requests are in flight and replies go
 * out in completion order (the cookie ties them together).
 *
 * Bounds: in-flight requests and bytes per connection, and unsent reply bytes, each have a named
 * maximum; past one the connection stops reading until it falls back under it. A request that
 * cannot be parsed safely (bad magic, an oversized payload we will not drain) ends that
 * connection only; nothing a client sends can throw out of this module.
 *
 * Shutdown (`close`): stop accepting, stop reading new requests, finish the ones in flight, then
 * close each connection. The daemon flushes the store after that.
 */
import net from 'node:net'
import tls from 'node:tls'
import { performance } from 'node:perf_hooks'
import type { AddressInfo } from 'node:net'
import { isDuplexError, errorMessage } from '../core/errors.js'
import type { ErrorCode } from '../core/errors.js'
import { unreachable } from '../core/assert.js'
import type { Logger } from '../core/log.js'
import { ByteQueue } from './byte-queue.js'
import type { Attachment, ExportRegistry } from './exports.js'
import { Handshake } from './handshake.js'
import type { BlockSizes, ClientIdentity, TransmissionStart } from './handshake.js'
import {
  BASE_ALLOCATION_ID,
  Errno,
  IHAVEOPT,
  OPTION_DATA_BYTES_MAX,
  OPTION_HEADER_BYTES,
  Opt,
  PAYLOAD_BYTES_MAX,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
  Rep,
  StateFlag,
  decodeOptionHeader,
  decodeRequestHeader,
  encodeBlockStatusChunk,
  encodeDataChunkHeader,
  encodeErrorChunk,
  encodeOptionError,
  encodeServerGreeting,
  encodeSimpleReply,
  hasPayload,
  validateRequest,
} from './protocol.js'
import type { Command, RequestHeader, TransmissionContext } from './protocol.js'

/**
 * Told about every request a client sent in transmission (metrics, src/metrics/io-metrics.ts):
 * `started` when it is dispatched, `finished` once its reply is queued. `kind` is the command
 * (read, write, flush, trim, zero, cache, blockStatus); `bytes` the data it carries or asks for.
 */
export interface NbdRequestObserver {
  started(volume: string, kind: string): void
  finished(volume: string, kind: string, bytes: number, seconds: number, failed: boolean): void
}

/**
 * NBD over TLS, as QEMU does it: the client sends NBD_OPT_STARTTLS and the connection turns into
 * a TLS session (x509). `required`: every other option before it gets NBD_REP_ERR_TLS_REQD.
 * `secureContext()` holds the server's certificate and key, and, when `verifyClients`, the CA that must
 * have signed the clients' certificates (mutual TLS: a client without one is refused).
 */
export interface NbdTlsOptions {
  /** The context for the next handshake (the newest certificate after a rotation). */
  secureContext: () => tls.SecureContext
  required: boolean
  verifyClients: boolean
}

export interface NbdServerOptions {
  registry: ExportRegistry
  log: Logger
  observer?: NbdRequestObserver
  tls?: NbdTlsOptions
  blockSizes?: BlockSizes
  /** A client that has not finished option haggling by then is disconnected. */
  handshakeTimeoutMs?: number
  /** Options a client may send before choosing an export. */
  optionsMax?: number
  inflightRequestsMax?: number
  inflightBytesMax?: number
  /** Reply bytes queued in the socket beyond which we stop reading new requests. */
  unsentBytesMax?: number
  /** Write payloads up to this size are drained after an error reply; larger ones end the connection. */
  drainBytesMax?: number
  /** How long `close` waits for in-flight requests before cutting connections. */
  shutdownGraceMs?: number
}

export const DEFAULT_BLOCK_SIZES: BlockSizes = {
  minBytes: 1,
  preferredBytes: 4096,
  maxBytes: PAYLOAD_BYTES_MAX,
}

const BLOCK_STATUS_EXTENTS_MAX = 8192
/** How long a connection we ended may stay half-open before we cut it. */
const END_LINGER_MS = 2_000

interface Limits {
  handshakeTimeoutMs: number
  optionsMax: number
  inflightRequestsMax: number
  inflightBytesMax: number
  unsentBytesMax: number
  drainBytesMax: number
}

export class NbdServer {
  private readonly server: net.Server
  private readonly connections = new Set<Connection>()
  private readonly limits: Limits
  private readonly blockSizes: BlockSizes
  private readonly shutdownGraceMs: number
  private closing = false

  constructor(private readonly options: NbdServerOptions) {
    this.blockSizes = options.blockSizes ?? DEFAULT_BLOCK_SIZES
    this.limits = {
      handshakeTimeoutMs: options.handshakeTimeoutMs ?? 10_000,
      optionsMax: options.optionsMax ?? 256,
      inflightRequestsMax: options.inflightRequestsMax ?? 256,
      inflightBytesMax: options.inflightBytesMax ?? 128 * 1024 * 1024,
      unsentBytesMax: options.unsentBytesMax ?? 64 * 1024 * 1024,
      drainBytesMax: options.drainBytesMax ?? 2 * PAYLOAD_BYTES_MAX,
    }
    this.shutdownGraceMs = options.shutdownGraceMs ?? 30_000
    this.server = net.createServer({ noDelay: true }, (socket) => {
      this.accept(socket)
    })
  }

  get connectionCount(): number {
    return this.connections.size
  }

  async listen(host: string, port: number): Promise<AddressInfo> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject)
      this.server.listen({ host, port }, () => {
        this.server.off('error', reject)
        resolve()
      })
    })
    this.server.on('error', (error) => {
      this.options.log.error('listener failed', { error: errorMessage(error) })
    })
    return this.server.address() as AddressInfo
  }

  /** Stops accepting, lets in-flight requests finish, then closes every connection. */
  async close(): Promise<void> {
    if (this.closing) return
    this.closing = true
    const listenerClosed = new Promise<void>((resolve) => {
      this.server.close(() => {
        resolve()
      })
    })
    const drained = Promise.all([...this.connections].map((c) => c.shutdown()))
    let timer: NodeJS.Timeout | undefined
    const grace = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => {
        resolve('timeout')
      }, this.shutdownGraceMs)
    })
    if ((await Promise.race([drained, grace])) === 'timeout') {
      this.options.log.warn('in-flight requests did not finish in time; cutting connections')
      for (const connection of this.connections) connection.destroy()
    }
    clearTimeout(timer)
    await listenerClosed
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy()
      return
    }
    const peer = `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? 0}`
    const connection = new Connection(socket, {
      registry: this.options.registry,
      log: this.options.log.child(`conn ${peer}`),
      blockSizes: this.blockSizes,
      limits: this.limits,
      observer: this.options.observer,
      tls: this.options.tls,
      onClosed: () => this.connections.delete(connection),
    })
    this.connections.add(connection)
  }
}

interface ConnectionDeps {
  registry: ExportRegistry
  log: Logger
  blockSizes: BlockSizes
  limits: Limits
  observer: NbdRequestObserver | undefined
  tls: NbdTlsOptions | undefined
  onClosed: () => void
}

type Phase =
  | { kind: 'clientFlags' }
  | { kind: 'optionHeader' }
  | { kind: 'optionData'; option: number; length: number }
  | { kind: 'optionDrain'; option: number; remaining: number }
  | { kind: 'requestHeader' }
  | { kind: 'payload'; header: RequestHeader; command: Command }
  | { kind: 'drain'; header: RequestHeader; remaining: number; errno: number; message: string }
  | { kind: 'closing' }
  /** The TLS handshake after STARTTLS runs. */
  | { kind: 'tls' }

class Connection {
  private readonly queue = new ByteQueue()
  private readonly handshake: Handshake
  private phase: Phase = { kind: 'clientFlags' }
  private optionsSeen = 0
  private handshakeTimer: NodeJS.Timeout | undefined
  private attachment: Attachment | undefined
  private context: TransmissionContext | undefined
  private inflightRequests = 0
  private inflightBytes = 0
  private paused = false
  private corked = false
  private closed = false
  /** TLS is on and the client's certificate was verified against the CA. */
  private clientVerified = false
  private readonly idleWaiters: (() => void)[] = []
  private readonly closeWaiters: (() => void)[] = []

  constructor(
    private socket: net.Socket,
    private readonly deps: ConnectionDeps,
  ) {
    const tlsMode = deps.tls === undefined ? 'off' : deps.tls.required ? 'required' : 'optional'
    this.handshake = new Handshake(deps.registry, deps.blockSizes, tlsMode, () =>
      this.clientIdentity(),
    )
    socket.setKeepAlive(true, 30_000)
    this.listenTo(socket)
    this.handshakeTimer = setTimeout(() => {
      deps.log.warn('handshake timed out; disconnecting')
      this.destroy()
    }, deps.limits.handshakeTimeoutMs)
    socket.write(encodeServerGreeting())
  }

  private readonly onData = (chunk: Buffer): void => {
    // Nothing more will be parsed once closing: buffering it would let a client that ignores
    // our FIN grow the queue without bound.
    if (this.phase.kind === 'closing') return
    this.queue.push(chunk)
    this.pump()
  }

  private readonly onDrain = (): void => {
    this.pump()
  }

  private readonly onError = (error: Error): void => {
    this.deps.log.debug('socket error', { error: errorMessage(error) })
  }

  private readonly onClose = (): void => {
    this.onSocketClosed()
  }

  private listenTo(socket: net.Socket): void {
    socket.on('data', this.onData)
    socket.on('drain', this.onDrain)
    socket.on('error', this.onError)
    socket.on('close', this.onClose)
  }

  /**
   * NBD_OPT_STARTTLS was acknowledged: the rest of the connection is a TLS session on the same
   * TCP stream. The client waits for the ACK before its TLS hello, so nothing may be queued.
   */
  private startTls(): boolean {
    const options = this.deps.tls
    if (options === undefined || this.queue.length > 0) {
      this.deps.log.warn('bytes after STARTTLS before the TLS handshake; disconnecting')
      this.destroy()
      return false
    }
    const raw = this.socket
    raw.off('data', this.onData)
    raw.off('drain', this.onDrain)
    raw.off('error', this.onError)
    raw.off('close', this.onClose)
    const secure = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: options.secureContext(),
      requestCert: options.verifyClients,
      rejectUnauthorized: options.verifyClients,
    })
    this.socket = secure
    this.listenTo(secure)
    secure.once('secure', () => {
      this.clientVerified = options.verifyClients
      this.handshake.secured()
      this.phase = { kind: 'optionHeader' }
      this.pump()
    })
    secure.on('error', (error) => {
      this.deps.log.warn('TLS handshake or session failed', { error: errorMessage(error) })
    })
    this.phase = { kind: 'tls' }
    return false
  }

  /** The client's address, and its certificate's common name once TLS verified it. */
  private clientIdentity(): ClientIdentity {
    const address = this.socket.remoteAddress ?? ''
    // With client verification on, OpenSSL refused any certificate the CA did not sign during
    // the handshake (a TLSSocket made by hand does not set `authorized`).
    if (!(this.socket instanceof tls.TLSSocket) || !this.clientVerified) {
      return { address, certificateName: undefined }
    }
    const subject = this.socket.getPeerCertificate().subject as
      Record<string, string | string[] | undefined> | undefined
    const name = subject?.['CN']
    return { address, certificateName: typeof name === 'string' ? name : undefined }
  }

  /** Stops reading requests, waits for in-flight ones, then closes. */
  async shutdown(): Promise<void> {
    if (this.closed) return
    if (this.context === undefined) {
      this.destroy()
    } else {
      this.phase = { kind: 'closing' }
      this.socket.pause()
      await this.whenIdle()
      this.socket.end()
    }
    await new Promise<void>((resolve) => {
      if (this.closed) resolve()
      else this.closeWaiters.push(resolve)
    })
  }

  destroy(): void {
    this.socket.destroy()
  }

  /**
   * FIN once the queued replies are flushed; a peer that then keeps its half open is cut after
   * END_LINGER_MS (counted from the flush, so a slow reader still gets every reply).
   */
  private endSoon(): void {
    this.phase = { kind: 'closing' }
    this.socket.end(() => {
      setTimeout(() => {
        this.socket.destroy()
      }, END_LINGER_MS).unref()
    })
  }

  private whenIdle(): Promise<void> {
    if (this.inflightRequests === 0) return Promise.resolve()
    return new Promise((resolve) => this.idleWaiters.push(resolve))
  }

  private onSocketClosed(): void {
    this.closed = true
    clearTimeout(this.handshakeTimer)
    this.phase = { kind: 'closing' }
    void this.whenIdle().then(() => {
      this.attachment?.detach()
      this.attachment = undefined
      this.deps.onClosed()
      for (const resolve of this.closeWaiters.splice(0)) resolve()
    })
  }

  /** Consumes as many whole protocol units as the queue holds and the limits allow. */
  private pump(): void {
    for (;;) {
      if (this.closed) return
      if (!this.step()) break
    }
    this.applyBackpressure()
  }

  private applyBackpressure(): void {
    const over = this.overLimits()
    if (over && !this.paused) {
      this.paused = true
      this.socket.pause()
    } else if (!over && this.paused && this.phase.kind !== 'closing') {
      this.paused = false
      this.socket.resume()
    }
  }

  private overLimits(): boolean {
    const { limits } = this.deps
    return (
      this.inflightRequests >= limits.inflightRequestsMax ||
      this.inflightBytes >= limits.inflightBytesMax ||
      this.socket.writableLength >= limits.unsentBytesMax
    )
  }

  /** One protocol unit. Returns false when it needs more bytes or must wait. */
  private step(): boolean {
    const phase = this.phase
    switch (phase.kind) {
      case 'clientFlags':
        return this.readClientFlags()
      case 'optionHeader':
        return this.readOptionHeader()
      case 'optionData':
        return this.readOptionData(phase.option, phase.length)
      case 'optionDrain':
        return this.drainOption(phase.option, phase.remaining)
      case 'requestHeader':
        return this.overLimits() ? false : this.readRequestHeader()
      case 'payload':
        return this.readPayload(phase.header, phase.command)
      case 'drain':
        return this.drainPayload(phase)
      case 'closing':
      case 'tls':
        return false
      default:
        return unreachable(phase)
    }
  }

  private readClientFlags(): boolean {
    if (this.queue.length < 4) return false
    const next = this.handshake.start(this.queue.take(4).readUInt32BE(0))
    if (next.kind === 'close') {
      this.deps.log.warn('client handshake flags refused; disconnecting')
      this.destroy()
      return false
    }
    this.phase = { kind: 'optionHeader' }
    return true
  }

  private readOptionHeader(): boolean {
    if (this.queue.length < OPTION_HEADER_BYTES) return false
    const header = decodeOptionHeader(this.queue.take(OPTION_HEADER_BYTES))
    if (header.magic !== IHAVEOPT) {
      this.deps.log.warn('bad option magic; disconnecting')
      this.destroy()
      return false
    }
    this.optionsSeen += 1
    if (this.optionsSeen > this.deps.limits.optionsMax) {
      this.deps.log.warn('too many options; disconnecting', {
        optionsMax: this.deps.limits.optionsMax,
      })
      this.destroy()
      return false
    }
    if (header.length > OPTION_DATA_BYTES_MAX) {
      // Consume it to keep the stream in sync, then refuse. The handshake timer bounds the cost.
      this.phase = { kind: 'optionDrain', option: header.option, remaining: header.length }
    } else {
      this.phase = { kind: 'optionData', option: header.option, length: header.length }
    }
    return true
  }

  private drainOption(option: number, remaining: number): boolean {
    const left = remaining - this.queue.skip(remaining)
    if (left > 0) {
      this.phase = { kind: 'optionDrain', option, remaining: left }
      return false
    }
    if (option === Opt.EXPORT_NAME) {
      this.destroy()
      return false
    }
    this.socket.write(encodeOptionError(option, Rep.ERR_TOO_BIG, 'option data too large'))
    this.phase = { kind: 'optionHeader' }
    return true
  }

  private readOptionData(option: number, length: number): boolean {
    if (this.queue.length < length) return false
    const { replies, next } = this.handshake.option(option, this.queue.take(length))
    for (const reply of replies) this.socket.write(reply)
    switch (next.kind) {
      case 'continue':
        this.phase = { kind: 'optionHeader' }
        return true
      case 'close':
        this.endSoon()
        return false
      case 'transmission':
        return this.enterTransmission(next.start)
      case 'starttls':
        return this.startTls()
      default:
        return unreachable(next)
    }
  }

  private enterTransmission(start: TransmissionStart): boolean {
    const attachment = this.deps.registry.attach(start.exportName)
    if (attachment === undefined) {
      // Deleted between the option reply and now: nothing sensible to say on the wire.
      this.destroy()
      return false
    }
    clearTimeout(this.handshakeTimer)
    this.attachment = attachment
    const info = attachment.device.info
    this.context = {
      sizeBytes: info.sizeBytes,
      readOnly: info.readOnly,
      structuredReplies: start.structuredReplies,
      baseAllocation: start.baseAllocation,
      minBlockBytes: this.deps.blockSizes.minBytes,
    }
    this.deps.log.debug('client attached', { export: info.name })
    this.phase = { kind: 'requestHeader' }
    return true
  }

  private readRequestHeader(): boolean {
    if (this.queue.length < REQUEST_HEADER_BYTES) return false
    const header = decodeRequestHeader(this.queue.take(REQUEST_HEADER_BYTES))
    if (header.magic !== REQUEST_MAGIC) {
      this.deps.log.warn('bad request magic; disconnecting')
      this.destroy()
      return false
    }
    const context = this.context
    if (context === undefined) return false
    const validated = validateRequest(header, context)
    if (!validated.ok) {
      if (!hasPayload(header)) {
        this.replyError(header.cookie, validated.errno, validated.message)
        return true
      }
      if (header.length > this.deps.limits.drainBytesMax) {
        this.replyError(header.cookie, validated.errno, validated.message)
        this.deps.log.warn('write payload too large to drain; disconnecting', {
          length: header.length,
        })
        this.endSoon()
        return false
      }
      this.phase = {
        kind: 'drain',
        header,
        remaining: header.length,
        errno: validated.errno,
        message: validated.message,
      }
      return true
    }
    const command = validated.command
    if (command.kind === 'write') {
      this.phase = { kind: 'payload', header, command }
      return true
    }
    if (command.kind === 'disconnect') {
      this.phase = { kind: 'closing' }
      void this.whenIdle().then(() => {
        this.endSoon()
      })
      return false
    }
    this.dispatch(header.cookie, command, undefined)
    return true
  }

  private readPayload(header: RequestHeader, command: Command): boolean {
    if (this.queue.length < header.length) return false
    const payload = this.queue.take(header.length)
    this.phase = { kind: 'requestHeader' }
    this.dispatch(header.cookie, command, payload)
    return true
  }

  private drainPayload(phase: Extract<Phase, { kind: 'drain' }>): boolean {
    phase.remaining -= this.queue.skip(phase.remaining)
    if (phase.remaining > 0) return false
    this.replyError(phase.header.cookie, phase.errno, phase.message)
    this.phase = { kind: 'requestHeader' }
    return true
  }

  private dispatch(cookie: bigint, command: Command, payload: Buffer | undefined): void {
    const bytes = command.kind === 'read' ? command.length : (payload?.length ?? 0)
    this.inflightRequests += 1
    this.inflightBytes += bytes
    const { observer } = this.deps
    const volume = this.attachment?.device.info.name ?? ''
    const started = observer === undefined ? 0 : performance.now()
    observer?.started(volume, command.kind)
    let failed = false
    this.execute(cookie, command, payload)
      .catch((error: unknown) => {
        failed = true
        this.replyFailure(cookie, error)
      })
      .finally(() => {
        const seconds = (performance.now() - started) / 1000
        observer?.finished(volume, command.kind, bytes, seconds, failed)
        this.inflightRequests -= 1
        this.inflightBytes -= bytes
        if (this.inflightRequests === 0) {
          for (const resolve of this.idleWaiters.splice(0)) resolve()
        }
        this.pump()
      })
  }

  private async execute(
    cookie: bigint,
    command: Command,
    payload: Buffer | undefined,
  ): Promise<void> {
    const attachment = this.attachment
    if (attachment === undefined) return
    const device = attachment.device
    switch (command.kind) {
      case 'read': {
        const data = await device.read(command.offset, command.length)
        this.replyData(cookie, command.offset, data)
        return
      }
      case 'write':
        if (payload === undefined) return
        await device.write(command.offset, payload, command.fua)
        break
      case 'flush':
        await device.flush()
        break
      case 'trim':
        await device.trim(command.offset, command.length, command.fua)
        break
      case 'zero':
        await device.zero(command.offset, command.length, command)
        break
      case 'cache':
        await device.cache(command.offset, command.length)
        break
      case 'blockStatus': {
        const max = command.reqOne ? 1 : BLOCK_STATUS_EXTENTS_MAX
        const extents = await device.allocation(command.offset, command.length, max)
        this.replyExtents(cookie, extents)
        return
      }
      case 'disconnect':
        return
      default:
        unreachable(command)
    }
    this.send(encodeSimpleReply(cookie, 0))
  }

  /**
   * Queues a reply. Replies completed in the same event-loop turn leave in one writev: the
   * socket is corked at the first and uncorked once the turn's I/O callbacks have run. At depth
   * 32 that saves most of the per-reply syscalls. With no other request in flight there is
   * nothing to wait for, so the reply goes out at once (depth-1 latency).
   */
  private send(...buffers: Buffer[]): void {
    if (this.socket.destroyed) return
    if (!this.corked && this.inflightRequests <= 1) {
      if (buffers.length === 1) {
        this.socket.write(buffers[0] as Buffer)
        return
      }
      this.socket.cork()
      for (const buffer of buffers) this.socket.write(buffer)
      this.socket.uncork()
      return
    }
    if (!this.corked) {
      this.corked = true
      this.socket.cork()
      setImmediate(() => {
        this.corked = false
        this.socket.uncork()
      })
    }
    for (const buffer of buffers) this.socket.write(buffer)
  }

  private replyData(cookie: bigint, offset: number, data: Buffer): void {
    if (this.context?.structuredReplies === true) {
      this.send(encodeDataChunkHeader(cookie, offset, data.length, true), data)
    } else {
      this.send(encodeSimpleReply(cookie, 0), data)
    }
  }

  private replyExtents(
    cookie: bigint,
    extents: readonly { lengthBytes: number; hole: boolean; zero: boolean }[],
  ): void {
    if (extents.length === 0) {
      this.replyError(cookie, Errno.EIO, 'no allocation information for the range')
      return
    }
    const encoded = extents.map((e) => ({
      length: e.lengthBytes,
      flags: (e.hole ? StateFlag.HOLE : 0) | (e.zero ? StateFlag.ZERO : 0),
    }))
    this.send(encodeBlockStatusChunk(cookie, BASE_ALLOCATION_ID, encoded))
  }

  private replyError(cookie: bigint, errno: number, message: string): void {
    if (this.context?.structuredReplies === true) {
      this.send(encodeErrorChunk(cookie, errno, message))
    } else {
      this.send(encodeSimpleReply(cookie, errno))
    }
  }

  private replyFailure(cookie: bigint, error: unknown): void {
    const errno = isDuplexError(error) ? errnoFor(error.code) : Errno.EIO
    if (errno === Errno.EIO) {
      this.deps.log.error('request failed', { error: errorMessage(error) })
    }
    this.replyError(cookie, errno, errorMessage(error))
  }
}

/** The only place where duplex error codes become NBD errnos. */
export function errnoFor(code: ErrorCode): number {
  switch (code) {
    case 'INVALID_ARGUMENT':
    case 'OUT_OF_RANGE':
      return Errno.EINVAL
    case 'NO_SPACE':
      return Errno.ENOSPC
    case 'READ_ONLY':
    case 'PERMISSION_DENIED':
      return Errno.EPERM
    case 'NOT_SUPPORTED':
      return Errno.ENOTSUP
    case 'SHUTTING_DOWN':
      return Errno.ESHUTDOWN
    case 'VOLUME_NOT_FOUND':
    case 'VOLUME_EXISTS':
    case 'NOT_FOUND':
    case 'ALREADY_EXISTS':
    case 'VOLUME_BUSY':
    case 'STORE_LOCKED':
    case 'STORE_CORRUPT':
    case 'IO_ERROR':
    case 'UNAVAILABLE':
    case 'NOT_PRIMARY':
    case 'FAILED_PRECONDITION':
    case 'CHECKSUM_MISMATCH':
      return Errno.EIO
    default:
      return unreachable(code)
  }
}
