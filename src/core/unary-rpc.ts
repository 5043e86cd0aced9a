/**
 * Unary gRPC calls with protobufjs codecs and validated fields: the edge shared by every duplex
 * service (Peer in src/replica/peer-control.ts, Witness in src/witness/witness-service.ts).
 *
 * Method definitions move raw Buffers, so every byte from the other side is decoded here
 * (protobufjs reflection) and checked once by the call's readers: uint64 values are safe
 * integers, names and messages bounded, enums known. The same `Problem` checks guard both
 * directions: what arrives is refused as malformed, what is about to be sent is asserted.
 *
 * Errors travel inside the reply (an `ErrorStatus` field named `error`), never as a gRPC status:
 * a handler's DuplexError reaches the caller as a DuplexError with the same code and message;
 * anything else it throws is logged and arrives as IO_ERROR; a malformed request is answered
 * INVALID_ARGUMENT without reaching the handler. On the client, a malformed reply rejects with
 * IO_ERROR and a failed transport (no connection, deadline, cancellation: any gRPC status) with
 * UNAVAILABLE.
 */
import { dirname, isAbsolute, join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { fileURLToPath } from 'node:url'
import * as grpc from '@grpc/grpc-js'
import protobuf from 'protobufjs'
import { assert } from './assert.js'
import { DuplexError, errorMessage } from './errors.js'
import type { ErrorCode } from './errors.js'
import type { Logger } from './log.js'
import { clusterChannelOptions, identityOfSubject } from './tls.js'
import type { Identity } from './tls.js'

/** Bytes (UTF-8) of a volume, node or domain name. */
export const nameBytesMax = 64
/** Bytes (UTF-8) of an error message; longer ones are cut before they are sent. */
export const textBytesMax = 4096

// ---------------------------------------------------------------------------------------------
// Error codes

/** Every ErrorCode: a code missing here, or one not in the union, fails the build. */
const errorCodes = {
  INVALID_ARGUMENT: true,
  OUT_OF_RANGE: true,
  NO_SPACE: true,
  READ_ONLY: true,
  NOT_SUPPORTED: true,
  VOLUME_NOT_FOUND: true,
  VOLUME_EXISTS: true,
  NOT_FOUND: true,
  ALREADY_EXISTS: true,
  VOLUME_BUSY: true,
  STORE_LOCKED: true,
  STORE_CORRUPT: true,
  IO_ERROR: true,
  SHUTTING_DOWN: true,
  UNAVAILABLE: true,
  NOT_PRIMARY: true,
  FAILED_PRECONDITION: true,
  CHECKSUM_MISMATCH: true,
  PERMISSION_DENIED: true,
} satisfies Record<ErrorCode, true>

function isErrorCode(code: string): code is ErrorCode {
  return Object.hasOwn(errorCodes, code)
}

/** The error a caller sees for an ErrorStatus from the other side. */
export function remoteError(code: string, message: string, what: string): DuplexError {
  if (isErrorCode(code)) return new DuplexError(code, message)
  return new DuplexError('IO_ERROR', `${what} failed with unknown code ${code}: ${message}`)
}

/** A reply from `what` (e.g. "peer") that failed its checks. */
export function malformedReply(reason: string, what: string): DuplexError {
  return new DuplexError('IO_ERROR', `${what} sent a malformed reply: ${reason}`)
}

// ---------------------------------------------------------------------------------------------
// Checks, shared by both directions: a problem found in received bytes makes them malformed; in
// values about to be sent, it is a programmer error (assert).

export type Problem = string | undefined

export function firstProblem(...problems: Problem[]): Problem {
  return problems.find((problem) => problem !== undefined)
}

export function assertNoProblem(problem: Problem, what: string): void {
  assert(problem === undefined, `${what}: ${problem ?? ''}`)
}

export function uintProblem(value: number, name: string): Problem {
  if (Number.isSafeInteger(value) && value >= 0) return undefined
  return `${name} ${value} is not a safe unsigned integer`
}

export function textProblem(
  value: string,
  name: string,
  bytesMax: number,
  required: boolean,
): Problem {
  if (required && value.length === 0) return `${name} missing`
  if (Buffer.byteLength(value) > bytesMax) return `${name} longer than ${bytesMax} bytes`
  return undefined
}

export function nameProblem(value: string, name: string, required = true): Problem {
  return textProblem(value, name, nameBytesMax, required)
}

// ---------------------------------------------------------------------------------------------
// Schemas

/** dist/src/core/unary-rpc.js -> proto/ at the repository (or package) root. */
export const protoDir = join(dirname(fileURLToPath(import.meta.url)), '../../../proto')

/**
 * Load `file` (e.g. "duplex/v1/peer.proto") and its imports, all relative to `protoDir` as
 * with `protoc -I proto`.
 */
export function loadProto(file: string): protobuf.Root {
  const root = new protobuf.Root()
  root.resolvePath = (_origin, target) => (isAbsolute(target) ? target : join(protoDir, target))
  return root.loadSync(file)
}

// ---------------------------------------------------------------------------------------------
// Calls

/** A protobufjs message as plain fields: written by the encoders, validated by the readers. */
export type Fields = Record<string, unknown>

/** One unary call: its types on the wire, and how to write and read each side. */
export interface Rpc<Request, Reply> {
  readonly name: string
  readonly path: string
  readonly requestType: protobuf.Type
  readonly replyType: protobuf.Type
  readonly requestProblem: (request: Request) => Problem
  readonly writeRequest: (request: Request) => Fields
  readonly readRequest: (message: Fields) => Request
  readonly replyProblem: (reply: Reply) => Problem
  readonly writeReply: (reply: Reply) => Fields
  readonly readReply: (message: Fields) => Reply
}

export type RpcCodec<Request, Reply> = Omit<
  Rpc<Request, Reply>,
  'name' | 'path' | 'requestType' | 'replyType'
>

/**
 * Call `name` of `service` (e.g. `duplex.v1.Peer`), whose messages are `<package>.<name>Request`
 * and `<package>.<name>Reply` in `root`.
 */
export function rpc<Request, Reply>(
  root: protobuf.Root,
  service: string,
  name: string,
  codec: RpcCodec<Request, Reply>,
): Rpc<Request, Reply> {
  const pkg = service.slice(0, service.lastIndexOf('.'))
  return {
    name,
    path: `/${service}/${name}`,
    requestType: root.lookupType(`${pkg}.${name}Request`),
    replyType: root.lookupType(`${pkg}.${name}Reply`),
    ...codec,
  }
}

const identity = (buffer: Buffer): Buffer => buffer

export function method(call: {
  name: string
  path: string
}): grpc.MethodDefinition<Buffer, Buffer> {
  return {
    path: call.path,
    requestStream: false,
    responseStream: false,
    requestSerialize: identity,
    requestDeserialize: identity,
    responseSerialize: identity,
    responseDeserialize: identity,
    originalName: call.name.charAt(0).toLowerCase() + call.name.slice(1),
  }
}

/** Wire value of a string enum listed in `values` (UNSPECIFIED = 0 comes first on the wire). */
export function enumToWire<T>(values: readonly T[], value: T): number {
  const index = values.indexOf(value)
  assert(index >= 0, `unknown enum value ${String(value)}`)
  return index + 1
}

// ---------------------------------------------------------------------------------------------
// Readers: each throws Malformed; only the edges (server answer, client exchange) catch it.

export class Malformed extends Error {
  override name = 'Malformed'
}

export function fail(message: string): never {
  throw new Malformed(message)
}

export function failOn(problem: Problem): void {
  if (problem !== undefined) fail(problem)
}

/** protobufjs writes 64-bit values from `{low, high}` and reads them as Long (same shape). */
interface LongBits {
  low: number
  high: number
}

function isLongBits(value: unknown): value is LongBits {
  if (typeof value !== 'object' || value === null) return false
  const { low, high } = value as Partial<LongBits>
  return typeof low === 'number' && typeof high === 'number'
}

export function fixed64(value: bigint): LongBits {
  assert(value >= 0n && value < 1n << 64n, 'a fixed64 must fit in 64 bits')
  return { low: Number(value & 0xffffffffn) | 0, high: Number(value >> 32n) | 0 }
}

export function readU64(message: Fields, name: string): number {
  const value = message[name]
  if (typeof value === 'number') {
    failOn(uintProblem(value, name))
    return value
  }
  if (!isLongBits(value)) return fail(`${name} is not an integer`)
  const high = value.high >>> 0
  if (high >= 0x200000) fail(`${name} exceeds 2^53`)
  return high * 0x100000000 + (value.low >>> 0)
}

export function readFixed64(message: Fields, name: string): bigint {
  const value = message[name]
  if (typeof value === 'number') return BigInt(value)
  if (!isLongBits(value)) return fail(`${name} is not an integer`)
  return (BigInt(value.high >>> 0) << 32n) | BigInt(value.low >>> 0)
}

export function readBool(message: Fields, name: string): boolean {
  const value = message[name]
  if (typeof value !== 'boolean') return fail(`${name} is not a bool`)
  return value
}

const emptyBytes = Buffer.alloc(0)

export function readBytes(message: Fields, name: string): Buffer {
  const value = message[name]
  // An absent bytes field reads as protobufjs's shared empty-array default.
  if (Array.isArray(value) && value.length === 0) return emptyBytes
  if (!(value instanceof Uint8Array)) return fail(`${name} is not bytes`)
  return toBuffer(value)
}

export function readString(message: Fields, name: string): string {
  const value = message[name]
  if (typeof value !== 'string') return fail(`${name} is not a string`)
  return value
}

export function readName(message: Fields, name: string, required = true): string {
  const value = readString(message, name)
  failOn(nameProblem(value, name, required))
  return value
}

/** An enum value listed in `values`; 0 (UNSPECIFIED) reads as undefined. */
export function readEnum<T>(message: Fields, name: string, values: readonly T[]): T | undefined {
  const value = message[name]
  if (typeof value !== 'number') return fail(`${name} is not an enum`)
  if (value === 0) return undefined
  const known = values[value - 1]
  if (known === undefined) return fail(`${name} ${value} unknown`)
  return known
}

export function readRequiredEnum<T>(message: Fields, name: string, values: readonly T[]): T {
  return readEnum(message, name, values) ?? fail(`${name} missing`)
}

/** A repeated message field, each element read by `read`; at most `countMax` elements. */
export function readRepeated<T>(
  message: Fields,
  name: string,
  countMax: number,
  read: (element: Fields) => T,
): T[] {
  const value = message[name]
  if (!Array.isArray(value)) return fail(`${name} is not a list`)
  if (value.length > countMax) fail(`${name} has more than ${countMax} elements`)
  return value.map((element: unknown) => {
    if (typeof element !== 'object' || element === null) return fail(`${name} holds a non-message`)
    return read(element as Fields)
  })
}

/** A repeated uint64 field; at most `countMax` values, each a safe integer. */
export function readU64List(message: Fields, name: string, countMax: number): number[] {
  const value = message[name]
  if (!Array.isArray(value)) return fail(`${name} is not a list`)
  if (value.length > countMax) fail(`${name} has more than ${countMax} elements`)
  return value.map((_element: unknown, index) => readU64({ v: value[index] }, 'v'))
}

/** A repeated fixed64 field; at most `countMax` values. */
export function readFixed64List(message: Fields, name: string, countMax: number): bigint[] {
  const value = message[name]
  if (!Array.isArray(value)) return fail(`${name} is not a list`)
  if (value.length > countMax) fail(`${name} has more than ${countMax} elements`)
  return value.map((_element: unknown, index) => readFixed64({ v: value[index] }, 'v'))
}

/** A repeated string field of names; at most `countMax`. */
export function readNames(message: Fields, name: string, countMax: number): string[] {
  const value = message[name]
  if (!Array.isArray(value)) return fail(`${name} is not a list`)
  if (value.length > countMax) fail(`${name} has more than ${countMax} elements`)
  return value.map((element: unknown, index) => {
    if (typeof element !== 'string') return fail(`${name}[${index}] is not a string`)
    failOn(nameProblem(element, `${name}[${index}]`))
    return element
  })
}

function toBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length)
}

export function encodeMessage(type: protobuf.Type, fields: Fields): Buffer {
  return toBuffer(type.encode(fields).finish())
}

export function decodeMessage<T>(
  type: protobuf.Type,
  bytes: Uint8Array,
  read: (m: Fields) => T,
): T {
  let message: Fields
  try {
    message = type.decode(bytes)
  } catch (error) {
    // protobufjs throws RangeError/Error on truncated or invalid wire data.
    return fail(`not a ${type.name}: ${errorMessage(error)}`)
  }
  return read(message)
}

// ---------------------------------------------------------------------------------------------
// Replies: a value, or the error status that replaced it.

export type Answer<T> = { ok: true; value: T } | { ok: false; code: string; message: string }

/** Error codes are ErrorCode names; this bounds what an unknown one may cost. */
const errorCodeBytesMax = 64

function readAnswer<T>(message: Fields, read: (message: Fields) => T): Answer<T> {
  const error = message.error
  if (error === null || error === undefined) return { ok: true, value: read(message) }
  if (typeof error !== 'object') return fail('error is not a message')
  const status = error as Fields
  const code = readString(status, 'code')
  const text = readString(status, 'message')
  failOn(textProblem(code, 'error code', errorCodeBytesMax, true))
  failOn(textProblem(text, 'error message', textBytesMax, false))
  return { ok: false, code, message: text }
}

/** `text` cut to `textBytesMax` UTF-8 bytes (a cut character becomes one U+FFFD). */
function boundedText(text: string): string {
  if (Buffer.byteLength(text) <= textBytesMax) return text
  return Buffer.from(text)
    .subarray(0, textBytesMax - 3)
    .toString()
}

function encodeError(call: { replyType: protobuf.Type }, code: ErrorCode, message: string): Buffer {
  return encodeMessage(call.replyType, { error: { code, message: boundedText(message) } })
}

/** Decode a reply (throws Malformed). */
export function readReply<Request, Reply>(
  call: Rpc<Request, Reply>,
  bytes: Buffer | undefined,
): Answer<Reply> {
  if (bytes === undefined) return fail('no reply message')
  return decodeMessage(call.replyType, bytes, (message) => readAnswer(message, call.readReply))
}

// ---------------------------------------------------------------------------------------------
// Server

interface ServeContext {
  log: Logger
  caller: Caller
  /** Where the handler runs, for error messages: "the peer", "the witness". */
  where: string
}

/** Who made a call: its address, and its certificate's identity on a TLS server. */
export interface Caller {
  address: string
  identity: Identity | undefined
}

/**
 * Decides whether `caller` may make a call with `request`: returns, or throws a DuplexError
 * (PERMISSION_DENIED) that becomes the reply. Runs after decoding, before the handler.
 */
export type Authorize<Request> = (request: Request, caller: Caller) => void

/** The caller; its certificate is read only when a rule will look at it (a TLS server). */
function callerOf(call: grpc.ServerUnaryCall<Buffer, Buffer>, withIdentity: boolean): Caller {
  const certificate = withIdentity ? call.getAuthContext().sslPeerCertificate : undefined
  return { address: call.getPeer(), identity: identityOfSubject(certificate?.subject) }
}

/** The reply bytes for request `bytes`. Never rejects: every failure becomes an ErrorStatus. */
async function answer<Request, Reply>(
  call: Rpc<Request, Reply>,
  bytes: Buffer,
  run: (request: Request, peer: string) => Promise<Reply>,
  context: ServeContext,
  authorize: Authorize<Request> | undefined,
): Promise<Buffer> {
  let request: Request
  try {
    request = decodeMessage(call.requestType, bytes, call.readRequest)
  } catch (error) {
    const reason = errorMessage(error)
    const peer = context.caller.address
    context.log.warn('malformed request', { rpc: call.name, peer, reason })
    return encodeError(call, 'INVALID_ARGUMENT', `malformed ${call.name} request: ${reason}`)
  }
  try {
    authorize?.(request, context.caller)
  } catch (error) {
    const reason = errorMessage(error)
    context.log.warn('refused a call', { rpc: call.name, peer: context.caller.address, reason })
    if (error instanceof DuplexError) return encodeError(call, error.code, error.message)
    return encodeError(call, 'PERMISSION_DENIED', reason)
  }
  try {
    const reply = await run(request, context.caller.address)
    assertNoProblem(call.replyProblem(reply), `${call.name} handler reply`)
    return encodeMessage(call.replyType, call.writeReply(reply))
  } catch (error) {
    if (error instanceof DuplexError) return encodeError(call, error.code, error.message)
    const reason = errorMessage(error)
    const peer = context.caller.address
    context.log.error('handler failed', { rpc: call.name, peer, error: reason })
    return encodeError(call, 'IO_ERROR', `${call.name} failed on ${context.where}: ${reason}`)
  }
}

/**
 * The gRPC handler of `call`: decodes, asks `authorize` (if given), runs `run`, encodes its reply
 * or its error.
 */
export function unary<Request, Reply>(
  call: Rpc<Request, Reply>,
  run: (request: Request, peer: string) => Promise<Reply>,
  log: Logger,
  where: string,
  authorize?: Authorize<Request>,
): grpc.handleUnaryCall<Buffer, Buffer> {
  return (serverCall, callback) => {
    const context = { log, caller: callerOf(serverCall, authorize !== undefined), where }
    answer(call, serverCall.request, run, context, authorize).then(
      (reply) => {
        callback(null, reply)
      },
      (error: unknown) => {
        // Unreachable unless encoding an error status itself failed; never crash the daemon.
        log.error('cannot answer', { rpc: call.name, error: errorMessage(error) })
        callback({ code: grpc.status.INTERNAL, details: errorMessage(error) })
      },
    )
  }
}

// ---------------------------------------------------------------------------------------------
// Client

export interface UnaryClientOptions {
  /** Plaintext by default. */
  credentials?: grpc.ChannelCredentials
  channelOptions: grpc.ChannelOptions
  /** Deadline of a call when the caller names none. */
  deadlineMs: number
  /** Names the other side in errors, e.g. "peer" or "witness". */
  what: string
}

/** A channel stuck connecting this long is replaced (see `UnaryClient`). */
const stuckConnectMs = 1000

/**
 * Calls one server. One gRPC channel, connected lazily, reconnecting.
 *
 * grpc-js sets no timeout on a TCP connect: after a link that silently dropped packets heals, a
 * connect attempt begun during the outage waits for the kernel's SYN retries (up to ~2 min). So
 * a call that fails while the channel is still CONNECTING, more than a second after the last
 * replacement, replaces the channel: the next call starts a fresh connect.
 */
export class UnaryClient {
  private client: grpc.Client
  private closed = false
  private replacedAt = performance.now()

  constructor(
    readonly address: string,
    private readonly options: UnaryClientOptions,
  ) {
    this.client = this.newClient()
  }

  private newClient(): grpc.Client {
    const { credentials } = this.options
    return new grpc.Client(
      this.address,
      credentials ?? grpc.credentials.createInsecure(),
      credentials === undefined
        ? this.options.channelOptions
        : { ...clusterChannelOptions, ...this.options.channelOptions },
    )
  }

  private replaceIfStuck(): void {
    if (this.closed || performance.now() - this.replacedAt < stuckConnectMs) return
    const state = this.client.getChannel().getConnectivityState(false)
    if (state !== grpc.connectivityState.CONNECTING) return
    this.client.close()
    this.client = this.newClient()
    this.replacedAt = performance.now()
  }

  /** Check, encode and send `request`; the reply, or the error it carried. */
  async invoke<Request, Reply>(
    call: Rpc<Request, Reply>,
    request: Request,
    deadlineMs?: number,
  ): Promise<Reply> {
    assertNoProblem(call.requestProblem(request), `${call.name} request`)
    const bytes = encodeMessage(call.requestType, call.writeRequest(request))
    const answer = await this.exchange(call, bytes, this.deadline(deadlineMs))
    if (answer.ok) return answer.value
    throw remoteError(answer.code, answer.message, this.options.what)
  }

  deadline(deadlineMs = this.options.deadlineMs): Date {
    assert(Number.isFinite(deadlineMs) && deadlineMs > 0, 'deadlineMs must be positive')
    return new Date(Date.now() + deadlineMs)
  }

  /** One gRPC call: the decoded answer, or a DuplexError (UNAVAILABLE, IO_ERROR, SHUTTING_DOWN). */
  exchange<Request, Reply>(
    call: Rpc<Request, Reply>,
    bytes: Buffer,
    deadline: Date,
  ): Promise<Answer<Reply>> {
    if (this.closed) {
      const message = `${this.options.what} client for ${this.address} is closed`
      return Promise.reject(new DuplexError('SHUTTING_DOWN', message))
    }
    const metadata = new grpc.Metadata({ waitForReady: false })
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(
        call.path,
        identity,
        identity,
        bytes,
        metadata,
        { deadline },
        (error, reply) => {
          if (error !== null) {
            this.replaceIfStuck()
            reject(this.transportError(error))
            return
          }
          try {
            resolve(readReply(call, reply))
          } catch (failure) {
            reject(malformedReply(errorMessage(failure), this.options.what))
          }
        },
      )
    })
  }

  /** Close the channel; calls after this reject with SHUTTING_DOWN. */
  close(): void {
    this.closed = true
    this.client.close()
  }

  private transportError(error: grpc.ServiceError): DuplexError {
    const status = `${grpc.status[error.code]}: ${error.details}`
    const hint = tlsHint(error.details, this.options.credentials !== undefined)
    const message = `${this.options.what} ${this.address} unreachable: ${status}${hint}`
    return new DuplexError('UNAVAILABLE', message, { cause: error })
  }
}

/**
 * What to add to a failed connection's error when TLS is the likely cause: a handshake that
 * failed, or a plaintext client that a TLS server hung up on.
 */
function tlsHint(details: string, secure: boolean): string {
  if (/ECONNREFUSED|ENOTFOUND|EHOSTUNREACH|ETIMEDOUT|Deadline/i.test(details)) return ''
  if (secure) return ` (${tlsHintText})`
  return ' (if it runs cluster TLS, this side needs --credentials DIR; see docs/security.md)'
}

const tlsHintText =
  "the TLS handshake may have failed: both sides need current certificates from the cluster's CA, of the right role; see docs/security.md"

/** Whether an error message carries `tlsHint`'s advice. */
export function hasTlsHint(message: string): boolean {
  return message.includes(tlsHintText) || message.includes('this side needs --credentials')
}
