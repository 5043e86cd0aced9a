/**
 * Sizes as people write them ("50G", "512MiB", "4096") and as people read them ("1.0 GiB").
 * Binary multiples throughout: storage admins mean GiB when they say G.
 */
import { DuplexError } from './errors.js'

export const KiB = 1024
export const MiB = 1024 * KiB
export const GiB = 1024 * MiB
export const TiB = 1024 * GiB

const suffixes: Record<string, number> = {
  '': 1,
  b: 1,
  k: KiB,
  kb: KiB,
  kib: KiB,
  m: MiB,
  mb: MiB,
  mib: MiB,
  g: GiB,
  gb: GiB,
  gib: GiB,
  t: TiB,
  tb: TiB,
  tib: TiB,
  p: 1024 * TiB,
  pb: 1024 * TiB,
  pib: 1024 * TiB,
}

/** Parses "50G", "1.5TiB", "4096". Throws INVALID_ARGUMENT with the accepted forms. */
export function parseSize(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text)
  const multiplier = match ? suffixes[(match[2] ?? '').toLowerCase()] : undefined
  if (!match || multiplier === undefined) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `cannot read size "${text}": use a number with an optional unit, e.g. 4096, 512M, 50G, 2T`,
    )
  }
  const bytes = Number(match[1]) * multiplier
  if (!Number.isSafeInteger(bytes)) {
    throw new DuplexError('INVALID_ARGUMENT', `size "${text}" is not a whole number of bytes`)
  }
  return bytes
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB']
  let value = bytes
  let unit = 0
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024
    unit += 1
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(1)} ${units[unit] ?? ''}`
}
