/**
 * What the extension reads and writes on the kernel websocket, and nothing
 * else: which URLs are kernel channels, the `chspawner_received` query
 * argument, and a message's channel and `chspawner_seq` (its top-level
 * metadata) in both of jupyter_server's websocket protocols. Pure: no
 * JupyterLab import, so the unit tests run it under plain Node.
 */

/** JupyterLab 4's binary protocol (jupyter_server's serialize_msg_to_ws_v1). */
export const V1_PROTOCOL = 'v1.kernel.websocket.jupyter.org';

/** The query argument a page sends on a kernel websocket (protocol section 2). */
export const RECEIVED_ARG = 'chspawner_received';

/** A kernel websocket: `.../api/kernels/<kernel id>/channels?session_id=<id>`. */
export interface IChannelsTarget {
  kernelId: string;
  /** The client session (JupyterLab's KernelConnection.clientId): '' if absent. */
  sessionId: string;
}

const CHANNELS = /\/api\/kernels\/([^/?#]+)\/channels(?:[?#]|$)/;

/** The kernel and session of a kernel channels URL, or null for any other URL. */
export function parseChannelsUrl(url: string): IChannelsTarget | null {
  const match = CHANNELS.exec(url);
  if (!match) {
    return null;
  }
  const query = url.split('#')[0].split('?')[1] ?? '';
  let sessionId = '';
  for (const pair of query.split('&')) {
    const [name, value = ''] = pair.split('=');
    if (name === 'session_id') {
      sessionId = safeDecode(value);
    }
  }
  return { kernelId: safeDecode(match[1]), sessionId };
}

/**
 * ``url`` with `chspawner_received=<seq>` (an earlier one replaced). Built by
 * hand, not with URLSearchParams, which would re-encode the other arguments
 * (the token among them).
 */
export function withReceived(url: string, seq: number): string {
  const [beforeHash, ...hash] = url.split('#');
  const [path, query = ''] = beforeHash.split('?');
  const kept = query
    .split('&')
    .filter(pair => pair !== '' && pair.split('=')[0] !== RECEIVED_ARG);
  kept.push(`${RECEIVED_ARG}=${Math.floor(seq)}`);
  return [`${path}?${kept.join('&')}`, ...hash].join('#');
}

/** A message's channel and its keeper's sequence number, if it has one. */
export interface ISeqInfo {
  channel: string;
  seq: number | null;
}

/**
 * The channel and `metadata.chspawner_seq` of one websocket frame as
 * JupyterLab receives it (``protocol``: the socket's selected protocol, '' for
 * the legacy JSON one); null when the frame can't be read (then it is handed
 * on untouched, and JupyterLab reports it as it would).
 */
export function readSeq(data: unknown, protocol: string): ISeqInfo | null {
  try {
    if (typeof data === 'string') {
      return fromMessage(JSON.parse(data));
    }
    const buffer = asArrayBuffer(data);
    if (buffer === null) {
      return null;
    }
    if (protocol === V1_PROTOCOL) {
      return readV1(buffer);
    }
    return readLegacyBinary(buffer);
  } catch {
    return null;
  }
}

/**
 * The v1 frame: a little-endian uint64 count of offsets, the offsets
 * (uint64), then channel, header, parent header, metadata, content and the
 * buffers, each from its offset to the next. Only the channel and the
 * metadata are decoded: the metadata is small, whatever the content's size.
 */
function readV1(buffer: ArrayBuffer): ISeqInfo | null {
  const view = new DataView(buffer);
  const count = Number(view.getBigUint64(0, true));
  if (count < 5 || 8 * (count + 1) > buffer.byteLength) {
    return null;
  }
  const offset = (i: number): number => Number(view.getBigUint64(8 * (i + 1), true));
  const text = (from: number, to: number): string =>
    new TextDecoder('utf-8').decode(new Uint8Array(buffer, from, to - from));
  const channel = text(offset(0), offset(1));
  // The metadata runs to the content's offset; the content to the next
  // offset or the frame's end.
  const metadata = JSON.parse(text(offset(3), offset(4)));
  return { channel, seq: seqOf(metadata) };
}

/**
 * The legacy protocol's binary frame (a message with buffers): a big-endian
 * uint32 count of offsets, the offsets, then the message's JSON and its
 * buffers.
 */
function readLegacyBinary(buffer: ArrayBuffer): ISeqInfo | null {
  const view = new DataView(buffer);
  const count = view.getUint32(0);
  if (count < 1 || 4 * (count + 1) > buffer.byteLength) {
    return null;
  }
  const start = view.getUint32(4);
  const end = count > 1 ? view.getUint32(8) : buffer.byteLength;
  const json = new TextDecoder('utf-8').decode(new Uint8Array(buffer, start, end - start));
  return fromMessage(JSON.parse(json));
}

function fromMessage(msg: any): ISeqInfo | null {
  if (msg === null || typeof msg !== 'object') {
    return null;
  }
  return { channel: String(msg.channel ?? ''), seq: seqOf(msg.metadata) };
}

/** `metadata.chspawner_seq` when it is a whole number, else null. */
export function seqOf(metadata: any): number | null {
  const seq = metadata?.chspawner_seq;
  return typeof seq === 'number' && Number.isSafeInteger(seq) && seq >= 0 ? seq : null;
}

function asArrayBuffer(data: unknown): ArrayBuffer | null {
  if (data instanceof ArrayBuffer) {
    return data;
  }
  if (ArrayBuffer.isView(data)) {
    const view = data as ArrayBufferView;
    return view.buffer.slice(view.byteOffset, view.byteOffset + view.byteLength) as ArrayBuffer;
  }
  return null; // a Blob: JupyterLab sets binaryType "arraybuffer", so none come
}

function safeDecode(text: string): string {
  try {
    return decodeURIComponent(text.replace(/\+/g, ' '));
  } catch {
    return text;
  }
}
