/**
 * Operational errors with stable codes. Components throw `DuplexError`; the edges translate the
 * code: to an NBD errno in src/nbd, to a gRPC status in the gRPC adapters, to an exit code and a
 * sentence in src/cli. Handle them with exhaustive switches over `ErrorCode`.
 */

export type ErrorCode =
  | 'INVALID_ARGUMENT' // malformed input from a client, peer, admin or config file
  | 'OUT_OF_RANGE' // a request beyond the end of a volume
  | 'NO_SPACE' // a write past the end, or a store without room
  | 'READ_ONLY' // a write to a read-only export
  | 'NOT_SUPPORTED' // a valid request this backend cannot do (e.g. FAST_ZERO without a fast path)
  | 'VOLUME_NOT_FOUND'
  | 'VOLUME_EXISTS'
  | 'NOT_FOUND' // a domain or node (catalog) that does not exist
  | 'ALREADY_EXISTS' // a domain or node (catalog) with that name exists
  | 'VOLUME_BUSY' // a volume still in use (e.g. clients attached when deleting)
  | 'STORE_LOCKED' // the data directory is held by another process
  | 'STORE_CORRUPT' // metadata that fails its own checks
  | 'IO_ERROR' // the local disk failed
  | 'SHUTTING_DOWN'
  | 'NOT_PRIMARY' // a forwarded request reached a node that is not (or not yet) the primary
  | 'UNAVAILABLE' // cannot serve now, may later: peer unreachable, role changing, replica syncing
  | 'FAILED_PRECONDITION' // refused in the current state (e.g. promoting an Inconsistent replica)
  | 'CHECKSUM_MISMATCH' // a payload failed its xxh64 check; never applied
  | 'PERMISSION_DENIED' // the caller's certificate does not allow this (cluster TLS)

export class DuplexError extends Error {
  override name = 'DuplexError'
  readonly code: ErrorCode
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
  }
}

export function isDuplexError(error: unknown, code?: ErrorCode): error is DuplexError {
  return error instanceof DuplexError && (code === undefined || error.code === code)
}

export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error)
}
