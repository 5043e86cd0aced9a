/**
 * The fixed-newstyle option phase of an NBD connection, as a pure state machine.
 *
 * Events: the client's handshake flags (`start`), then one `option(code, data)` per option the
 * client sends. Effects: the reply buffers to write, and what happens next: keep haggling, close
 * the connection, or enter transmission with a chosen export. The socket driver in server.ts reads
 * whole options (header and payload) before calling `option`, so a malformed payload can never
 * desynchronise the stream: it is consumed first and answered with ERR_INVALID.
 *
 * State: NO_ZEROES, whether structured replies were negotiated, and the meta context selected by
 * the last SET_META_CONTEXT (which is bound to the export it named).
 */
import type { ExportInfo } from './exports.js'
import {
  BASE_ALLOCATION,
  BASE_ALLOCATION_ID,
  ClientFlag,
  Info,
  Opt,
  Rep,
  TransmissionFlag,
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeOptionError,
  encodeOptionReply,
  encodeServerEntry,
  metaContextMatches,
} from './protocol.js'

export interface BlockSizes {
  minBytes: number
  preferredBytes: number
  maxBytes: number
}

/** Who is asking: the client's address, and the common name of its TLS certificate if any. */
export interface ClientIdentity {
  address: string
  certificateName: string | undefined
}

export interface ExportLookup {
  list(): ExportInfo[]
  find(name: string): ExportInfo | undefined
  /** Why `client` may not open `name` (a volume's access list), or undefined if it may. */
  refuse?(name: string, client: ClientIdentity): string | undefined
}

export interface TransmissionStart {
  exportName: string
  flags: number
  structuredReplies: boolean
  baseAllocation: boolean
}

export type Next =
  | { kind: 'continue' }
  | { kind: 'close' }
  | { kind: 'transmission'; start: TransmissionStart }
  /** The ACK is in the replies: switch the connection to TLS, then `secured()`. */
  | { kind: 'starttls' }

/** NBD over TLS (NBD_OPT_STARTTLS): not offered, offered, or required before anything else. */
export type TlsMode = 'off' | 'optional' | 'required'

export interface Step {
  replies: Buffer[]
  next: Next
}

const STARTTLS: Next = { kind: 'starttls' }
const CONTINUE: Next = { kind: 'continue' }
const CLOSE: Next = { kind: 'close' }
const KNOWN_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES

export function transmissionFlags(info: ExportInfo, structuredReplies: boolean): number {
  let flags =
    TransmissionFlag.HAS_FLAGS |
    TransmissionFlag.SEND_FLUSH |
    TransmissionFlag.SEND_FUA |
    TransmissionFlag.SEND_TRIM |
    TransmissionFlag.SEND_WRITE_ZEROES |
    TransmissionFlag.CAN_MULTI_CONN |
    TransmissionFlag.SEND_CACHE |
    TransmissionFlag.SEND_FAST_ZERO
  if (structuredReplies) flags |= TransmissionFlag.SEND_DF
  if (info.readOnly) flags |= TransmissionFlag.READ_ONLY
  return flags
}

export class Handshake {
  private noZeroes = false
  private structuredReplies = false
  private metaContext: { exportName: string; baseAllocation: boolean } | undefined
  private secure = false

  constructor(
    private readonly exports: ExportLookup,
    private readonly blockSizes: BlockSizes,
    private readonly tls: TlsMode = 'off',
    private readonly client: () => ClientIdentity = () => ({
      address: '',
      certificateName: undefined,
    }),
  ) {}

  /** Why this client may not open `info` (undefined: it may). */
  private refusal(info: ExportInfo): string | undefined {
    return this.exports.refuse?.(info.name, this.client())
  }

  /**
   * The connection runs over TLS now. As the protocol says, what was negotiated in the clear is
   * forgotten (structured replies, meta contexts): the client negotiates again.
   */
  secured(): void {
    this.secure = true
    this.structuredReplies = false
    this.metaContext = undefined
  }

  get isSecure(): boolean {
    return this.secure
  }

  /** The client's 32-bit flags. Unknown bits, or a client without FIXED_NEWSTYLE, are refused. */
  start(clientFlags: number): Next {
    if ((clientFlags & ~KNOWN_CLIENT_FLAGS) !== 0) return CLOSE
    if ((clientFlags & ClientFlag.FIXED_NEWSTYLE) === 0) return CLOSE
    this.noZeroes = (clientFlags & ClientFlag.NO_ZEROES) !== 0
    return CONTINUE
  }

  option(option: number, data: Buffer): Step {
    if (option === Opt.STARTTLS) return this.startTls(data)
    if (this.tls === 'required' && !this.secure && option !== Opt.ABORT) {
      // NBD_OPT_EXPORT_NAME has no error reply: the only answer is to hang up.
      if (option === Opt.EXPORT_NAME) return { replies: [], next: CLOSE }
      return this.reply(
        encodeOptionError(
          option,
          Rep.ERR_TLS_REQD,
          'this server requires TLS: connect with TLS (NBD_OPT_STARTTLS, an nbds:// URI)',
        ),
      )
    }
    switch (option) {
      case Opt.EXPORT_NAME:
        return this.exportName(data)
      case Opt.ABORT:
        return { replies: [encodeOptionReply(option, Rep.ACK)], next: CLOSE }
      case Opt.LIST:
        return this.list(data)
      case Opt.INFO:
      case Opt.GO:
        return this.infoOrGo(option, data)
      case Opt.STRUCTURED_REPLY:
        return this.structuredReply(data)
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        return this.metaContextOption(option, data)
      default:
        return this.reply(
          encodeOptionError(option, Rep.ERR_UNSUP, `option ${option} is not supported`),
        )
    }
  }

  private startTls(data: Buffer): Step {
    const option = Opt.STARTTLS
    if (this.tls === 'off') {
      return this.reply(encodeOptionError(option, Rep.ERR_UNSUP, 'TLS is not configured here'))
    }
    if (this.secure) {
      return this.reply(encodeOptionError(option, Rep.ERR_INVALID, 'TLS is already on'))
    }
    if (data.length !== 0) {
      return this.reply(encodeOptionError(option, Rep.ERR_INVALID, 'STARTTLS carries no data'))
    }
    return { replies: [encodeOptionReply(option, Rep.ACK)], next: STARTTLS }
  }

  private reply(...replies: Buffer[]): Step {
    return { replies, next: CONTINUE }
  }

  private resolve(name: string): ExportInfo | undefined {
    const found = this.exports.find(name)
    if (found !== undefined || name !== '') return found
    // The empty name is the default export: the only one, when there is exactly one.
    const all = this.exports.list()
    return all.length === 1 ? all[0] : undefined
  }

  private exportName(data: Buffer): Step {
    const info = data.length <= 4096 ? this.resolve(data.toString('utf8')) : undefined
    // NBD_OPT_EXPORT_NAME has no error reply: the only way to refuse is to hang up.
    if (info === undefined || this.refusal(info) !== undefined) return { replies: [], next: CLOSE }
    const flags = transmissionFlags(info, this.structuredReplies)
    return {
      replies: [encodeExportNameReply(info.sizeBytes, flags, this.noZeroes)],
      next: { kind: 'transmission', start: this.start_(info, flags) },
    }
  }

  private start_(info: ExportInfo, flags: number): TransmissionStart {
    const context = this.metaContext
    return {
      exportName: info.name,
      flags,
      structuredReplies: this.structuredReplies,
      baseAllocation:
        context !== undefined && context.exportName === info.name && context.baseAllocation,
    }
  }

  private list(data: Buffer): Step {
    if (data.length !== 0) {
      return this.reply(encodeOptionError(Opt.LIST, Rep.ERR_INVALID, 'NBD_OPT_LIST takes no data'))
    }
    const replies = this.exports
      .list()
      .filter((info) => this.refusal(info) === undefined)
      .map((info) => encodeOptionReply(Opt.LIST, Rep.SERVER, encodeServerEntry(info.name)))
    replies.push(encodeOptionReply(Opt.LIST, Rep.ACK))
    return { replies, next: CONTINUE }
  }

  private infoOrGo(option: number, data: Buffer): Step {
    const decoded = decodeInfoRequest(data)
    if (!decoded.ok) return this.reply(encodeOptionError(option, Rep.ERR_INVALID, decoded.message))
    const { name, infos } = decoded.value
    const info = this.resolve(name)
    if (info === undefined) {
      return this.reply(encodeOptionError(option, Rep.ERR_UNKNOWN, `no export named "${name}"`))
    }
    const refused = this.refusal(info)
    if (refused !== undefined) return this.reply(encodeOptionError(option, Rep.ERR_POLICY, refused))
    const flags = transmissionFlags(info, this.structuredReplies)
    const replies = [encodeOptionReply(option, Rep.INFO, encodeInfoExport(info.sizeBytes, flags))]
    const { minBytes, preferredBytes, maxBytes } = this.blockSizes
    // Block sizes are always sent: a client that ignores them loses nothing, and one that honours
    // them never sends a request we would reject for alignment.
    replies.push(
      encodeOptionReply(option, Rep.INFO, encodeInfoBlockSize(minBytes, preferredBytes, maxBytes)),
    )
    if (infos.includes(Info.NAME)) {
      replies.push(encodeOptionReply(option, Rep.INFO, encodeInfoString(Info.NAME, info.name)))
    }
    if (infos.includes(Info.DESCRIPTION) && info.description !== '') {
      replies.push(
        encodeOptionReply(option, Rep.INFO, encodeInfoString(Info.DESCRIPTION, info.description)),
      )
    }
    replies.push(encodeOptionReply(option, Rep.ACK))
    if (option === Opt.INFO) return { replies, next: CONTINUE }
    return { replies, next: { kind: 'transmission', start: this.start_(info, flags) } }
  }

  private structuredReply(data: Buffer): Step {
    if (data.length !== 0) {
      return this.reply(
        encodeOptionError(
          Opt.STRUCTURED_REPLY,
          Rep.ERR_INVALID,
          'NBD_OPT_STRUCTURED_REPLY takes no data',
        ),
      )
    }
    this.structuredReplies = true
    return this.reply(encodeOptionReply(Opt.STRUCTURED_REPLY, Rep.ACK))
  }

  private metaContextOption(option: number, data: Buffer): Step {
    // SET replaces the previous selection even when it fails (doc/proto.md, SET_META_CONTEXT).
    if (option === Opt.SET_META_CONTEXT) this.metaContext = undefined
    if (!this.structuredReplies) {
      return this.reply(
        encodeOptionError(option, Rep.ERR_INVALID, 'meta contexts need structured replies first'),
      )
    }
    const decoded = decodeMetaContextRequest(data)
    if (!decoded.ok) return this.reply(encodeOptionError(option, Rep.ERR_INVALID, decoded.message))
    const { name, queries } = decoded.value
    const info = this.resolve(name)
    if (info === undefined) {
      return this.reply(encodeOptionError(option, Rep.ERR_UNKNOWN, `no export named "${name}"`))
    }
    const listing = option === Opt.LIST_META_CONTEXT
    // LIST with no queries lists everything; SET with no queries selects nothing.
    const selected = listing && queries.length === 0 ? true : queries.some(metaContextMatches)
    const replies: Buffer[] = []
    if (selected) {
      replies.push(
        encodeOptionReply(
          option,
          Rep.META_CONTEXT,
          encodeMetaContext(listing ? 0 : BASE_ALLOCATION_ID, BASE_ALLOCATION),
        ),
      )
    }
    replies.push(encodeOptionReply(option, Rep.ACK))
    if (!listing) this.metaContext = { exportName: info.name, baseAllocation: selected }
    return { replies, next: CONTINUE }
  }
}
