/**
 * Config files for the daemons (`duplex node --config FILE`, `duplex witness --config FILE`):
 * a JSON object whose keys are the command's long options, e.g.
 *
 *   { "name": "a1", "data-dir": "/var/lib/duplex", "listen": "10.0.1.11:10809",
 *     "metrics-listen": "10.0.1.11:9580", "witness": "10.0.3.10:10815" }
 *
 * Options given on the command line win over the file. Every key must be an option of the
 * command with a value of its type: a typo or a wrong type is an error that names the file and
 * the key, never a silently ignored setting. (docs/cluster-admin.md has examples.)
 */
import { readFileSync } from 'node:fs'
import { DuplexError, errorMessage } from '../core/errors.js'

export type OptionType = 'string' | 'number' | 'boolean'

/** What `duplex node --config FILE` may set: the node command's options. */
export const nodeConfigOptions: Readonly<Record<string, OptionType>> = {
  'data-dir': 'string',
  listen: 'string',
  advertise: 'string',
  'metrics-listen': 'string',
  name: 'string',
  'block-size-min': 'number',
  witness: 'string',
  cluster: 'string',
  'tls-cert': 'string',
  'tls-key': 'string',
  'tls-ca': 'string',
  'tls-required': 'boolean',
  credentials: 'string',
}

/** What `duplex witness --config FILE` may set. */
export const witnessConfigOptions: Readonly<Record<string, OptionType>> = {
  'data-dir': 'string',
  listen: 'string',
  'metrics-listen': 'string',
  name: 'string',
  'lease-ms': 'number',
  credentials: 'string',
}

/** Reads and checks a daemon config file against the command's options (name -> type). */
export function readDaemonConfig(
  file: string,
  options: Readonly<Record<string, OptionType>>,
): Record<string, unknown> {
  let text: string
  try {
    text = readFileSync(file, 'utf8')
  } catch (error) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `cannot read config file ${file}: ${errorMessage(error)}`,
    )
  }
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch (error) {
    throw new DuplexError('INVALID_ARGUMENT', `${file}: not valid JSON: ${errorMessage(error)}`)
  }
  return checkDaemonConfig(json, file, options)
}

export function checkDaemonConfig(
  json: unknown,
  file: string,
  options: Readonly<Record<string, OptionType>>,
): Record<string, unknown> {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new DuplexError('INVALID_ARGUMENT', `${file}: expected a JSON object of options`)
  }
  const known = Object.keys(options)
  for (const [key, value] of Object.entries(json)) {
    const type = options[key]
    if (type === undefined) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `${file}: unknown option "${key}"; this command takes: ${known.join(', ')}`,
      )
    }
    const ok =
      type === 'number'
        ? typeof value === 'number' && Number.isFinite(value)
        : typeof value === type
    if (!ok) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `${file}: "${key}" must be a ${type}, not ${JSON.stringify(value)}`,
      )
    }
  }
  return json as Record<string, unknown>
}
