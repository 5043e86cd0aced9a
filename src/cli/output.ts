/**
 * How the CLI talks to people and scripts: exit codes that scripts can rely on, errors as one
 * readable sentence, and plain aligned tables (or JSON with --output json).
 */
import { isDuplexError, errorMessage } from '../core/errors.js'
import type { ErrorCode } from '../core/errors.js'
import { unreachable } from '../core/assert.js'

export const ExitCode = {
  OK: 0,
  /** The operation failed (the message says why and what to do). */
  FAILED: 1,
  /** The command line itself was wrong. */
  USAGE: 2,
  /** The thing named does not exist. */
  NOT_FOUND: 3,
  /** The thing is busy or locked; retrying later may work. */
  BUSY: 4,
  /** The credentials given do not allow this (cluster TLS). */
  DENIED: 5,
} as const

export function exitCodeFor(code: ErrorCode): number {
  switch (code) {
    case 'INVALID_ARGUMENT':
    case 'OUT_OF_RANGE':
      return ExitCode.USAGE
    case 'VOLUME_NOT_FOUND':
    case 'NOT_FOUND':
      return ExitCode.NOT_FOUND
    case 'VOLUME_BUSY':
    case 'STORE_LOCKED':
    case 'SHUTTING_DOWN':
    case 'UNAVAILABLE':
    case 'NOT_PRIMARY':
      return ExitCode.BUSY
    case 'NO_SPACE':
    case 'READ_ONLY':
    case 'NOT_SUPPORTED':
    case 'VOLUME_EXISTS':
    case 'ALREADY_EXISTS':
    case 'STORE_CORRUPT':
    case 'IO_ERROR':
    case 'FAILED_PRECONDITION':
    case 'CHECKSUM_MISMATCH':
      return ExitCode.FAILED
    case 'PERMISSION_DENIED':
      return ExitCode.DENIED
    default:
      return unreachable(code)
  }
}

/** Prints the error for a person and returns the exit code. */
export function reportError(error: unknown): number {
  if (isDuplexError(error)) {
    process.stderr.write(`duplex: ${error.message}\n`)
    return exitCodeFor(error.code)
  }
  process.stderr.write(`duplex: unexpected error: ${errorMessage(error)}\n`)
  if (error instanceof Error && error.stack !== undefined && process.env.DUPLEX_DEBUG) {
    process.stderr.write(`${error.stack}\n`)
  }
  return ExitCode.FAILED
}

export function formatTable(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)))
  const line = (cells: string[]): string =>
    cells
      .map((cell, i) => cell.padEnd(widths[i] ?? 0))
      .join('  ')
      .trimEnd()
  return [line(headers), ...rows.map(line)].join('\n') + '\n'
}
