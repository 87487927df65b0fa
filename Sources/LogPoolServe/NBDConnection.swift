import Foundation
import LogPool
import NIOCore

/// One client: fixed newstyle negotiation, then the transmission phase. Parsing and
/// replies run on the connection's event loop; engine calls run on the server's thread
/// pool, so requests complete (and are answered) in any order.
final class NBDConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// What a client is served after negotiation.
    struct Export: Sendable {
        let name: String
        let volume: Volume
        let size: UInt64
        let readOnly: Bool
    }

    enum State {
        case clientFlags
        case options
        case transmission(Export)
        case closing
    }

    let server: NBDServer
    private var state = State.clientFlags
    private var input = ByteBuffer()
    /// Engine calls decoded by the current pass of ``process(_:)`` and what to do with
    /// each result on the loop.
    private var batch: [(work: @Sendable () throws -> ByteBuffer?, complete: (Result<ByteBuffer?, any Error>) -> Void)] = []
    private var noZeroes = false
    /// An option is being answered on the thread pool: parse nothing more until it is.
    private var optionPending = false
    private var inFlight = 0
    private var requestCount = 0
    /// Payload bytes of a refused oversized write still to drop.
    private var skipping = 0
    private var disconnecting = false
    private var readingPaused = false
    /// NBD_OPT_STRUCTURED_REPLY was negotiated: READ and BLOCK_STATUS answer in chunks.
    private var structured = false
    /// The export for which NBD_OPT_SET_META_CONTEXT selected base:allocation.
    private var allocationContextExport: String? = nil
    /// base:allocation is active for the export being served.
    private var blockStatusEnabled = false
    private var peer = "client"
    /// Requests in flight before reading stops (backpressure).
    static let maximumInFlight = 64

    init(server: NBDServer) { self.server = server }

    func channelActive(context: ChannelHandlerContext) {
        peer = context.remoteAddress.map { "client \($0)" } ?? "client on unix socket"
        server.log("\(peer): connected")
        var hello = context.channel.allocator.buffer(capacity: 18)
        hello.writeInteger(NBD.initMagic)
        hello.writeInteger(NBD.optionMagic)
        hello.writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        context.writeAndFlush(wrapOutboundOut(hello), promise: nil)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        server.log("\(peer): disconnected after \(requestCount) requests")
        state = .closing
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        server.log("\(peer): connection error: \(error)")
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        // Take the incoming buffer as it is when nothing is left over (the common case),
        // so requests and write payloads are sliced from it without a copy; append only
        // to a partial request.
        if input.readableBytes == 0 {
            input = bytes
        } else {
            input.writeBuffer(&bytes)
        }
        process(context)
        // Drop what was consumed: payload slices in flight keep only their own storage
        // alive, and appending later never copies history (it did: the buffer grew by
        // every byte received and was copied whenever a slice still shared it).
        if input.readableBytes == 0 {
            input = ByteBuffer()
        } else if input.readerIndex >= 1 << 20 {
            input.discardReadBytes()
        }
    }

    /// Drops the connection with a log line (a malformed handshake or request).
    private func abandon(_ context: ChannelHandlerContext, _ why: String) {
        server.log("\(peer): \(why); closing the connection")
        state = .closing
        context.close(promise: nil)
    }

    /// Decodes what `input` holds, then hands the engine calls it produced to the pool.
    private func process(_ context: ChannelHandlerContext) {
        decode(context)
        dispatchBatch(context)
    }

    private func decode(_ context: ChannelHandlerContext) {
        while !optionPending {
            switch state {
            case .closing:
                return
            case .clientFlags:
                guard let flags = input.readInteger(as: UInt32.self) else { return }
                guard flags & NBD.clientFlagFixedNewstyle != 0 else {
                    return abandon(context, "client does not speak fixed newstyle negotiation (flags \(flags))")
                }
                guard flags & ~(NBD.clientFlagFixedNewstyle | NBD.clientFlagNoZeroes) == 0 else {
                    return abandon(context, "unknown client flags \(flags)")
                }
                noZeroes = flags & NBD.clientFlagNoZeroes != 0
                state = .options
            case .options:
                guard input.readableBytes >= 16 else { return }
                let start = input.readerIndex
                let magic = input.getInteger(at: start, as: UInt64.self)!
                let option = input.getInteger(at: start + 8, as: UInt32.self)!
                let length = Int(input.getInteger(at: start + 12, as: UInt32.self)!)
                guard magic == NBD.optionMagic else {
                    return abandon(context, String(format: "bad option magic 0x%016llx", magic))
                }
                guard length <= NBD.maximumOptionData else {
                    return abandon(context, "option \(option) carries \(length) bytes, more than \(NBD.maximumOptionData)")
                }
                guard input.readableBytes >= 16 + length else { return }
                input.moveReaderIndex(forwardBy: 16)
                let payload = input.readSlice(length: length)!
                handleOption(context, option, payload)
            case .transmission(let export):
                if skipping > 0 {
                    let drop = min(skipping, input.readableBytes)
                    input.moveReaderIndex(forwardBy: drop)
                    skipping -= drop
                    if skipping > 0 { return }
                }
                guard !disconnecting else { return }
                guard inFlight < Self.maximumInFlight else {
                    // Back-pressure: stop reading until requests complete.
                    try? context.channel.syncOptions?.setOption(.autoRead, value: false)
                    readingPaused = true
                    return
                }
                guard input.readableBytes >= NBD.requestHeaderByteCount else { return }
                let start = input.readerIndex
                let magic = input.getInteger(at: start, as: UInt32.self)!
                let flags = input.getInteger(at: start + 4, as: UInt16.self)!
                let type = input.getInteger(at: start + 6, as: UInt16.self)!
                let handle = input.getInteger(at: start + 8, as: UInt64.self)!
                let offset = input.getInteger(at: start + 16, as: UInt64.self)!
                let length = Int(input.getInteger(at: start + 24, as: UInt32.self)!)
                guard magic == NBD.requestMagic else {
                    return abandon(context, String(format: "bad request magic 0x%08x", magic))
                }
                let command = NBD.Command(rawValue: type)
                if command == .write && length > NBD.maximumPayload {
                    // Refuse, and drop the payload that follows so the stream stays in step.
                    input.moveReaderIndex(forwardBy: NBD.requestHeaderByteCount)
                    skipping = length
                    requestCount += 1
                    reply(context, handle: handle, error: NBD.einval)
                    continue
                }
                let payloadLength = command == .write ? length : 0
                guard input.readableBytes >= NBD.requestHeaderByteCount + payloadLength else { return }
                input.moveReaderIndex(forwardBy: NBD.requestHeaderByteCount)
                let payload = input.readSlice(length: payloadLength)!
                requestCount += 1
                handleRequest(context, export, command: command, flags: flags, handle: handle, offset: offset,
                              length: length, payload: payload)
            }
        }
    }

    // MARK: - Negotiation

    private func optionReply(_ context: ChannelHandlerContext, _ option: UInt32, _ reply: NBD.Reply, _ data: ByteBuffer? = nil) {
        var out = context.channel.allocator.buffer(capacity: 20 + (data?.readableBytes ?? 0))
        out.writeInteger(NBD.optionReplyMagic)
        out.writeInteger(option)
        out.writeInteger(reply.rawValue)
        out.writeInteger(UInt32(data?.readableBytes ?? 0))
        if var data { out.writeBuffer(&data) }
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
    }

    private func errorReply(_ context: ChannelHandlerContext, _ option: UInt32, _ reply: NBD.Reply, _ message: String) {
        var text = context.channel.allocator.buffer(capacity: message.utf8.count)
        text.writeString(message)
        optionReply(context, option, reply, text)
    }

    /// Runs `lookup` (an engine call) on the thread pool, then `then` on the loop, holding
    /// further parsing until it has.
    private func offload<T: Sendable>(_ context: ChannelHandlerContext, _ lookup: @escaping @Sendable () throws -> T,
                                      then: @escaping (Result<T, Error>) -> Void) {
        optionPending = true
        server.threadPool.runIfActive(eventLoop: context.eventLoop, lookup).assumeIsolated().whenComplete { result in
            self.optionPending = false
            then(result)
            self.process(context)
        }
    }

    private func exportFlags(_ export: Export) -> UInt16 {
        var flags = NBD.hasFlags | NBD.sendFlush | NBD.sendFUA | NBD.canMultiConn
        if export.readOnly {
            flags |= NBD.readOnly
        } else {
            flags |= NBD.sendTrim | NBD.sendWriteZeroes | NBD.sendFastZero
        }
        return flags
    }

    private func handleOption(_ context: ChannelHandlerContext, _ option: UInt32, _ payload: ByteBuffer) {
        var payload = payload
        switch NBD.Option(rawValue: option) {
        case .exportName:
            let name = payload.readString(length: payload.readableBytes) ?? ""
            offload(context, { [server] in try server.openExport(name) }) { result in
                guard case .success(let found?) = result else {
                    return self.abandon(context, "NBD_OPT_EXPORT_NAME for unknown export \"\(name)\"")
                }
                var out = context.channel.allocator.buffer(capacity: 134)
                out.writeInteger(found.size)
                out.writeInteger(self.exportFlags(found))
                if !self.noZeroes { out.writeRepeatingByte(0, count: 124) }
                context.writeAndFlush(self.wrapOutboundOut(out), promise: nil)
                self.startTransmission(found)
            }
        case .abort:
            optionReply(context, option, .ack)
            state = .closing
            context.close(promise: nil)
        case .list:
            guard payload.readableBytes == 0 else {
                return errorReply(context, option, .errInvalid, "NBD_OPT_LIST takes no data")
            }
            offload(context, { [server] in try server.exports() }) { result in
                switch result {
                case .success(let names):
                    for name in names {
                        var data = context.channel.allocator.buffer(capacity: 4 + name.utf8.count)
                        data.writeInteger(UInt32(name.utf8.count))
                        data.writeString(name)
                        self.optionReply(context, option, .server, data)
                    }
                    self.optionReply(context, option, .ack)
                case .failure(let error):
                    self.errorReply(context, option, .errInvalid, "cannot list exports: \(error)")
                }
            }
        case .structuredReply:
            guard payload.readableBytes == 0 else {
                return errorReply(context, option, .errInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            structured = true
            optionReply(context, option, .ack)
        case .listMetaContext, .setMetaContext:
            let set = NBD.Option(rawValue: option) == .setMetaContext
            guard let (name, queries) = Self.parseMetaContextRequest(&payload) else {
                return errorReply(context, option, .errInvalid, "malformed meta context request")
            }
            if set && !structured {
                return errorReply(context, option, .errInvalid, "NBD_OPT_SET_META_CONTEXT needs structured replies first")
            }
            offload(context, { [server] in try server.openExport(name) != nil }) { result in
                guard case .success(true) = result else {
                    return self.errorReply(context, option, .errUnknown, "no export named \"\(name)\"")
                }
                // base:allocation is the one context: matched by its name, or (for LIST)
                // by "base:" or by an empty query list.
                let wanted = queries.contains(NBD.allocationContext) || (!set && (queries.isEmpty || queries.contains("base:")))
                if wanted {
                    var data = context.channel.allocator.buffer(capacity: 4 + NBD.allocationContext.utf8.count)
                    data.writeInteger(NBD.allocationContextID)
                    data.writeString(NBD.allocationContext)
                    self.optionReply(context, option, .metaContext, data)
                }
                if set { self.allocationContextExport = wanted ? name : nil }
                self.optionReply(context, option, .ack)
            }
        case .startTLS:
            errorReply(context, option, .errPolicy, "TLS is not offered by this server")
        case .info, .go:
            guard let nameLength = payload.readInteger(as: UInt32.self), Int(nameLength) <= payload.readableBytes,
                  let name = payload.readString(length: Int(nameLength)),
                  let requestCount = payload.readInteger(as: UInt16.self),
                  payload.readableBytes == Int(requestCount) * 2
            else {
                return errorReply(context, option, .errInvalid, "malformed NBD_OPT_INFO/GO data")
            }
            offload(context, { [server] in try server.openExport(name) }) { result in
                switch result {
                case .success(let found?):
                    var info = context.channel.allocator.buffer(capacity: 12)
                    info.writeInteger(NBD.infoExport)
                    info.writeInteger(found.size)
                    info.writeInteger(self.exportFlags(found))
                    self.optionReply(context, option, .info, info)
                    var sizes = context.channel.allocator.buffer(capacity: 14)
                    sizes.writeInteger(NBD.infoBlockSize)
                    sizes.writeInteger(UInt32(1))
                    sizes.writeInteger(UInt32(self.server.pool.stats.blockSize))
                    sizes.writeInteger(UInt32(NBD.maximumPayload))
                    self.optionReply(context, option, .info, sizes)
                    self.optionReply(context, option, .ack)
                    if NBD.Option(rawValue: option) == .go { self.startTransmission(found) }
                case .success(nil):
                    self.errorReply(context, option, .errUnknown, "no export named \"\(name)\"")
                case .failure(let error):
                    self.errorReply(context, option, .errInvalid, "cannot open \"\(name)\": \(error)")
                }
            }
        default:
            errorReply(context, option, .errUnsupported, "option \(option) is not supported")
        }
    }

    /// Export name and queries of NBD_OPT_LIST/SET_META_CONTEXT data, or nil when malformed.
    static func parseMetaContextRequest(_ payload: inout ByteBuffer) -> (String, [String])? {
        guard let nameLength = payload.readInteger(as: UInt32.self), Int(nameLength) <= payload.readableBytes,
              let name = payload.readString(length: Int(nameLength)),
              let count = payload.readInteger(as: UInt32.self), Int(count) <= payload.readableBytes / 4
        else { return nil }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = payload.readInteger(as: UInt32.self), Int(length) <= payload.readableBytes,
                  let query = payload.readString(length: Int(length))
            else { return nil }
            queries.append(query)
        }
        return payload.readableBytes == 0 ? (name, queries) : nil
    }

    private func startTransmission(_ export: Export) {
        blockStatusEnabled = structured && allocationContextExport == export.name
        server.log("\(peer): serving \(export.name) (\(export.size) bytes, \(export.readOnly ? "read-only" : "read-write"))")
        state = .transmission(export)
    }

    // MARK: - Transmission

    private func reply(_ context: ChannelHandlerContext, handle: UInt64, error: UInt32, data: ByteBuffer? = nil) {
        var out = context.channel.allocator.buffer(capacity: 16)
        out.writeInteger(NBD.simpleReplyMagic)
        out.writeInteger(error)
        out.writeInteger(handle)
        if error == 0, let data {
            context.write(wrapOutboundOut(out), promise: nil)
            context.writeAndFlush(wrapOutboundOut(data), promise: nil)
        } else {
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        }
    }

    /// One structured reply chunk, the last of its request.
    private func chunk(_ context: ChannelHandlerContext, handle: UInt64, type: UInt16, _ body: ByteBuffer) {
        var body = body
        var out = context.channel.allocator.buffer(capacity: 20)
        out.writeInteger(NBD.structuredReplyMagic)
        out.writeInteger(NBD.replyFlagDone)
        out.writeInteger(type)
        out.writeInteger(handle)
        out.writeInteger(UInt32(body.readableBytes))
        if body.readableBytes <= 64 << 10 {
            out.writeBuffer(&body)
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        } else {
            context.write(wrapOutboundOut(out), promise: nil)
            context.writeAndFlush(wrapOutboundOut(body), promise: nil)
        }
    }

    /// An error answer: a structured error chunk where structured replies are on and the
    /// command is READ or BLOCK_STATUS, else a simple reply.
    private func fail(_ context: ChannelHandlerContext, _ command: NBD.Command?, handle: UInt64, error: UInt32) {
        if structured && (command == .read || command == .blockStatus) {
            var body = context.channel.allocator.buffer(capacity: 6)
            body.writeInteger(error)
            body.writeInteger(UInt16(0))
            chunk(context, handle: handle, type: NBD.replyTypeError, body)
        } else {
            reply(context, handle: handle, error: error)
        }
    }

    private func handleRequest(_ context: ChannelHandlerContext, _ export: Export, command: NBD.Command?, flags: UInt16,
                               handle: UInt64, offset: UInt64, length: Int, payload: ByteBuffer) {
        guard let command, command != .cache, command != .blockStatus || blockStatusEnabled else {
            return fail(context, command, handle: handle, error: NBD.einval)
        }
        if command == .disconnect {
            disconnecting = true
            if inFlight == 0 { context.close(promise: nil) }
            return
        }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        if command != .flush && (overflow || end > export.size || length > NBD.maximumPayload && command == .read) {
            server.log("\(peer): \(command) of \(length) bytes at \(offset) is outside \(export.name) (\(export.size) bytes)")
            return fail(context, command, handle: handle, error: NBD.einval)
        }
        if command == .blockStatus && length == 0 {
            return fail(context, command, handle: handle, error: NBD.einval)
        }
        if export.readOnly && [.write, .trim, .writeZeroes].contains(command) {
            return reply(context, handle: handle, error: NBD.eperm)
        }
        if command == .writeZeroes && flags & NBD.commandNoHole != 0 && flags & NBD.commandFastZero != 0 {
            // Writing zeros where a hole is not allowed is not fast; the client falls back.
            return reply(context, handle: handle, error: NBD.enotsup)
        }
        inFlight += 1
        let volume = export.volume
        let pool = server.pool
        let allocator = context.channel.allocator
        let fua = flags & NBD.commandFUA != 0
        let noHole = flags & NBD.commandNoHole != 0
        let structured = self.structured
        let reqOne = flags & NBD.commandReqOne != 0
        let work: @Sendable () throws -> ByteBuffer? = {
            switch command {
            case .blockStatus:
                var extents = try volume.extents(in: offset..<(offset + UInt64(length)))
                if reqOne { extents = Array(extents.prefix(1)) }
                var body = allocator.buffer(capacity: 4 + 8 * extents.count)
                body.writeInteger(NBD.allocationContextID)
                for extent in extents {
                    body.writeInteger(UInt32(extent.length))
                    body.writeInteger(extent.isMapped ? UInt32(0) : NBD.stateHole | NBD.stateZero)
                }
                return body
            case .read:
                var data = allocator.buffer(capacity: length + (structured ? 8 : 0))
                if structured { data.writeInteger(offset) }
                try data.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { raw in
                    try volume.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<length]))
                    return length
                }
                return data
            case .write:
                try payload.withUnsafeReadableBytes { try volume.write(at: offset, from: $0) }
            case .trim:
                try volume.discard(at: offset, length: UInt64(length))
            case .writeZeroes:
                if noHole {
                    let zeros = [UInt8](repeating: 0, count: min(length, 1 << 20))
                    var done = 0
                    while done < length {
                        let take = min(zeros.count, length - done)
                        try zeros.withUnsafeBytes { try volume.write(at: offset + UInt64(done), from: UnsafeRawBufferPointer(rebasing: $0[0..<take])) }
                        done += take
                    }
                } else {
                    try volume.discard(at: offset, length: UInt64(length))
                }
            case .flush:
                try pool.sync()
            case .disconnect, .cache:
                break
            }
            if fua && command != .read && command != .flush { try pool.sync() }
            return nil
        }
        batch.append((work, { result in
            self.inFlight -= 1
            switch result {
            case .success(let data):
                if command == .blockStatus, let data {
                    self.chunk(context, handle: handle, type: NBD.replyTypeBlockStatus, data)
                } else if command == .read && self.structured, let data {
                    self.chunk(context, handle: handle, type: NBD.replyTypeOffsetData, data)
                } else {
                    self.reply(context, handle: handle, error: 0, data: data)
                }
            case .failure(let error):
                self.server.log("\(self.peer): \(command) of \(length) bytes at \(offset) of \(export.name) failed: \(error)")
                self.fail(context, command, handle: handle, error: nbdError(error))
            }
            if self.disconnecting && self.inFlight == 0 {
                context.close(promise: nil)
            } else {
                if self.readingPaused && self.inFlight < Self.maximumInFlight {
                    self.readingPaused = false
                    try? context.channel.syncOptions?.setOption(.autoRead, value: true)
                    context.read()
                }
                self.process(context)
            }
        }))
    }

    /// Hands the engine calls decoded in one pass to the thread pool: at most one job per
    /// worker, each running its share in order and coming back to the loop once. At queue
    /// depth 16 a read of the socket holds many requests, and one hand-off per request
    /// (a futex wake-up each way) cost more than the read itself.
    private func dispatchBatch(_ context: ChannelHandlerContext) {
        guard !batch.isEmpty else { return }
        let items = batch
        batch = []
        let jobs = min(items.count, NBDServer.workerCount)
        let per = (items.count + jobs - 1) / jobs
        for start in stride(from: 0, to: items.count, by: per) {
            let share = items[start..<min(start + per, items.count)]
            let works = share.map(\.work)
            let completions = share.map(\.complete)
            server.threadPool.runIfActive(eventLoop: context.eventLoop) {
                works.map { work in Result { try work() } }
            }.assumeIsolated().whenComplete { result in
                switch result {
                case .success(let results):
                    for (complete, outcome) in zip(completions, results) { complete(outcome) }
                case .failure(let error):
                    for complete in completions { complete(.failure(error)) }
                }
            }
        }
    }
}
