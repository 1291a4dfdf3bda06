// Frames for the unit tests, built as jupyter_server builds them.

/** A v1 frame, as jupyter_server's serialize_msg_to_ws_v1 makes it. */
export function v1Frame(msg: any, buffers: Uint8Array[] = []): ArrayBuffer {
  const enc = new TextEncoder();
  const parts = [
    enc.encode(msg.channel),
    enc.encode(JSON.stringify(msg.header)),
    enc.encode(JSON.stringify(msg.parent_header)),
    enc.encode(JSON.stringify(msg.metadata)),
    enc.encode(JSON.stringify(msg.content)),
    ...buffers
  ];
  const count = parts.length + 1;
  const offsets = [8 * (count + 1)];
  for (const part of parts) {
    offsets.push(offsets[offsets.length - 1] + part.length);
  }
  const out = new Uint8Array(offsets[offsets.length - 1]);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(count), true);
  offsets.forEach((o, i) => view.setBigUint64(8 * (i + 1), BigInt(o), true));
  parts.forEach((part, i) => out.set(part, offsets[i]));
  return out.buffer;
}

export function message(seq: number | null, channel = 'iopub', extra: any = {}): any {
  return {
    channel,
    header: { msg_id: `m${seq}`, msg_type: 'stream' },
    parent_header: { msg_id: 'req' },
    metadata: seq === null ? {} : { chspawner_seq: seq, ...extra },
    content: { name: 'stdout', text: `${seq}\n` }
  };
}
