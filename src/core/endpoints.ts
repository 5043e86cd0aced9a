/** Parsing of HOST:PORT arguments, with errors that show the expected form. */
import { DuplexError } from './errors.js'

export interface Endpoint {
  host: string
  port: number
}

export function parseEndpoint(text: string, what: string): Endpoint {
  const match = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(text.trim())
  const port = match ? Number(match[3]) : NaN
  if (!match || port > 65535) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `${what} "${text}" is not HOST:PORT (e.g. 127.0.0.1:10809 or [::1]:10809)`,
    )
  }
  const host = match[1] ?? match[2] ?? ''
  return { host: host === '' ? '0.0.0.0' : host, port }
}

export function formatEndpoint(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`
}
