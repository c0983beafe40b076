//! `strata chat`: an interactive conversation in the terminal, driving the scheduler
//! in-process. Ctrl-C stops the current answer; at the prompt, a second Ctrl-C (or
//! Ctrl-D) quits; `/reset` forgets the conversation.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use strata_model::chat::{ChatMessage, ChatTemplate};
use strata_model::gguf::Gguf;
use strata_model::sampling::SamplingParams;
use strata_model::tokenizer::Tokenizer;
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};

use crate::cli::ChatArgs;
use crate::scheduler::{Event, FinishReason, GenRequest, PrefixReuse, Scheduler, SchedulerConfig};

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let path = &args.engine.model;
    let gguf = Gguf::open(path).with_context(|| format!("reading {}", path.display()))?;
    let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf)?);
    let template =
        ChatTemplate::from_gguf(&gguf)?.context("the model has no chat template (tokenizer.chat_template)")?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    eprintln!("loading {} ...", path.display());
    let engine = crate::engine::load(
        &gguf,
        &args.engine,
        crate::engine::EngineUse { max_seqs: 1, serving: true, checkpoints: true },
    )?;
    // Each turn sends the whole conversation again: the last turn's caches serve it.
    let config = strata_model::config::ModelConfig::from_gguf(&gguf)?;
    let prefix_reuse = PrefixReuse::for_model(&config);
    let speculation = crate::speculative::Speculation::new(&args.engine, &config);
    drop(gguf);
    let scheduler = Scheduler::spawn(
        engine,
        tokenizer.clone(),
        SchedulerConfig { max_seqs: 1, max_waiting: None, prefix_reuse, speculation },
    )?;
    eprintln!("ready. /reset clears the conversation; Ctrl-C stops an answer; Ctrl-D (or Ctrl-C twice) quits.");
    let history = args.system.iter().map(|s| ChatMessage::new("system", s.clone())).collect();
    let chat = Chat { scheduler, tokenizer, template, sampling, max_tokens: args.max_tokens, history, turn: 0 };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(chat.run())
}

/// A conversation: its messages so far, and how each answer is asked for.
struct Chat {
    scheduler: Scheduler,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    sampling: SamplingParams,
    max_tokens: u32,
    history: Vec<ChatMessage>,
    /// Answers asked for so far: each gets its own seed.
    turn: u64,
}

impl Chat {
    async fn run(mut self) -> anyhow::Result<()> {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = read_line(&mut lines).await? {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if line == "/reset" {
                self.history.retain(|m| m.role == "system");
                println!("(conversation cleared)");
                continue;
            }
            self.say(line).await?;
        }
        println!();
        Ok(())
    }

    /// Sends the user's `line` and streams the answer; both join the conversation.
    async fn say(&mut self, line: &str) -> anyhow::Result<()> {
        self.history.push(ChatMessage::new("user", line));
        let text = self.template.render(&self.history, true)?;
        let mut prompt: Vec<u32> = self.tokenizer.bos_to_add().into_iter().collect();
        prompt.extend(self.tokenizer.encode(&text, true)?);
        let ctx = self.scheduler.ctx() as usize;
        if prompt.len() >= ctx {
            self.history.pop();
            println!(
                "(the conversation is {} tokens, more than the context of {ctx}: /reset, or raise --ctx)",
                prompt.len()
            );
            return Ok(());
        }
        self.turn += 1;
        let request = GenRequest {
            max_tokens: self.max_tokens.min((ctx - prompt.len()) as u32),
            prompt,
            sampling: SamplingParams { seed: self.sampling.seed.wrapping_add(self.turn), ..self.sampling.clone() },
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
            constraint: None,
            draft_max: None,
        };
        let answer = stream_answer(&self.scheduler, request).await?;
        self.history.push(ChatMessage::new("assistant", answer));
        Ok(())
    }
}

/// Prompts for and reads the next line; `None` when the user quits (Ctrl-D, or Ctrl-C
/// twice in a row).
async fn read_line(lines: &mut Lines<BufReader<Stdin>>) -> anyhow::Result<Option<String>> {
    let mut out = std::io::stdout();
    let mut armed = false;
    loop {
        print!("> ");
        out.flush()?;
        tokio::select! {
            line = lines.next_line() => return Ok(line?),
            _ = tokio::signal::ctrl_c() => {
                if armed {
                    return Ok(None);
                }
                armed = true;
                println!("\n(Ctrl-C again or Ctrl-D to quit)");
            }
        }
    }
}

/// Prints an answer as it is generated, until it ends or Ctrl-C stops it; returns its text.
async fn stream_answer(scheduler: &Scheduler, request: GenRequest) -> anyhow::Result<String> {
    let mut out = std::io::stdout();
    let (_, mut rx) = scheduler.submit(request)?;
    let mut answer = String::new();
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(Event::Text(t)) => {
                    print!("{t}");
                    out.flush()?;
                    answer.push_str(&t);
                }
                Some(Event::Done(f)) => {
                    if f.reason == FinishReason::Length {
                        print!(" [length limit]");
                    }
                    break;
                }
                Some(Event::Logprob(_)) => {}
                Some(Event::Failed(e)) => {
                    print!("\n(error: {e})");
                    break;
                }
                None => anyhow::bail!("the scheduler stopped"),
            },
            _ = tokio::signal::ctrl_c() => {
                // Dropping the receiver cancels the request and frees its sequence.
                print!(" [stopped]");
                break;
            }
        }
    }
    drop(rx);
    println!();
    Ok(answer)
}
